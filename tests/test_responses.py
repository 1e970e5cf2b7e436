"""`/v1/responses` (the OpenAI Responses API), read by the official `openai` client.

- translation: input items, instructions, function tools and their call / output items become
  the chat request they mean; what needs stored state or OpenAI's own tools is a 400 naming it.
- the node, in process (the scripted fake executor of tests/test_serve_frontend.py): text and
  tool-call answers through `client.responses.create`, `client.responses.stream` and
  `stream=True`; a failure mid-stream is `response.failed`.
- the scheduler (scripted heads of tests/test_replay_scheduler.py): a broken pipeline is replayed
  and the client sees one Responses stream.
- agent loops (slow): the `openai-agents` SDK at its defaults and `pydantic-ai`, each running a
  two-step tool task against `parallax serve` with a scripted tiny model: the model calls the
  tool, gets its result back, and answers.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from processes import serving_tiny_models
from test_replay_scheduler import FULL, ScriptedHeads
from test_scheduler_app import WHOLE, Scheduler
from test_serve_frontend import CharTokenizer, Harness, run
from tiny_models import save_successor_model, save_word_tokenizer

from parallax.serving.errors import APIError
from parallax.serving.responses_api import ResponsesAdapter, responses_to_chat

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
# the fake executor ends every answer at its length; a stop string (our extension) ends it first
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>!'
STOP = {"stop": ["!"]}

# ---- translation ------------------------------------------------------------------------------


def test_a_conversation_with_tool_calls_becomes_the_chat_request():
    chat = responses_to_chat({
        "model": "default", "instructions": "Be brief.", "max_output_tokens": 32,
        "temperature": 0.5, "tools": [WEATHER], "tool_choice": {"type": "function",
                                                                "name": "get_weather"},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather",
             "arguments": '{"city": "Rome"}'},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "rain"}]})
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"}]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city.",
        "parameters": WEATHER["parameters"]}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["max_tokens"] == 32 and chat["temperature"] == 0.5 and chat["model"] == "default"
    assert responses_to_chat({"input": "Hi"})["messages"] == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, named", [
    ({"input": "x", "previous_response_id": "resp_1"}, "'previous_response_id'"),
    ({"input": "x", "store": True}, "'store'"),
    ({"input": "x", "conversation": "conv_1"}, "'conversation'"),
    ({"input": "x", "background": True}, "'background'"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "'web_search'"),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, "'file_search'"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "'item_reference'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input_image"),
    ({"input": []}, "'input'"),
    ({}, "'input'"),
])
def test_what_cannot_be_served_is_a_400_naming_it(body, named):
    with pytest.raises(APIError) as info:
        responses_to_chat(body)
    assert info.value.status == 400 and named in info.value.message


def test_stream_events_are_numbered_and_close_every_item():
    adapter = ResponsesAdapter(request={"input": "x"})

    def chunk(delta, finish=None):
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5,
                "model": "m", "choices": [{"index": 0, "delta": delta,
                                           "finish_reason": finish}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}

    events = []
    for delta, finish in (({"role": "assistant", "content": ""}, None),
                          ({"reasoning_content": "hmm"}, None), ({"content": "Hi"}, None),
                          ({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                            "function": {"name": "f", "arguments": ""}}]},
                           None),
                          ({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
                           None), ({}, "tool_calls")):
        events += adapter.on_event(chunk(delta, finish))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done")
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["id"] == "resp_1"
    assert [item["type"] for item in final["output"]] == ["reasoning", "message",
                                                          "function_call"]
    assert final["output"][2]["arguments"] == "{}" and final["usage"]["total_tokens"] == 5

    # through the scheduler a call comes whole, in one entry (the internal leg's shape)
    adapter = ResponsesAdapter(request={"input": "x"})
    whole = {"index": 0, "id": "call_9", "type": "function",
             "function": {"name": "f", "arguments": '{"a": 1}'}}
    events = adapter.on_event(chunk({"tool_calls": [whole]})) + \
        adapter.on_event(chunk({}, "tool_calls"))
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done[0]["arguments"] == '{"a": 1}' and done[0]["name"] == "f"
    assert events[-1]["response"]["output"][0]["call_id"] == "call_9"


# ---- the node, in process ---------------------------------------------------------------------


class ToolTokenizer(CharTokenizer):
    """Renders `tools` tersely (the fake model's context is short), in the Hermes format."""

    chat_template = "... <tool_call> ..."

    def apply_chat_template(self, messages, tools=None, **kw):
        names = ",".join(t["function"]["name"] for t in tools or [])
        return (f"[tools]{names}" if tools else "") + super().apply_chat_template(messages, **kw)


def client_of(h: Harness) -> openai.AsyncOpenAI:
    h.frontend.tokenizer = ToolTokenizer()
    transport = httpx.ASGITransport(app=h.http._transport.app)
    return openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="unused", max_retries=0,
                              http_client=httpx.AsyncClient(transport=transport))


def test_node_answers_text_non_streaming_and_streaming():
    async def scenario():
        async with Harness() as h:
            client = client_of(h)
            r = await client.responses.create(model="default", input="REPLY:Hello there!",
                                              instructions="Be kind.", extra_body=STOP)
            assert r.object == "response" and r.status == "completed"
            assert r.output_text == "Hello there" and r.id.startswith("resp_")
            assert r.usage.output_tokens == len("Hello there!")
            assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
            assert r.instructions == "Be kind."

            async with client.responses.stream(model="default", input="REPLY:Streamed!",
                                               max_output_tokens=100, extra_body=STOP) as stream:
                deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
                final = await stream.get_final_response()
            assert "".join(deltas) == "Streamed" and final.output_text == "Streamed"

            r = await client.responses.create(model="default", input="REPLY:abcdef",
                                              max_output_tokens=3)
            assert r.status == "incomplete" and r.output_text == "abc"
            assert r.incomplete_details.reason == "max_output_tokens"

    run(scenario())


def test_node_streams_a_tool_call_as_the_client_accumulates_it():
    async def scenario():
        async with Harness() as h:
            client = client_of(h)
            r = await client.responses.create(model="default", input="REPLY:" + CALL,
                                              tools=[WEATHER], extra_body=STOP)
            calls = [item for item in r.output if item.type == "function_call"]
            assert len(calls) == 1 and calls[0].name == "get_weather"
            assert json.loads(calls[0].arguments) == {"city": "Paris"}
            assert calls[0].call_id.startswith("call_") and "tool_call" not in r.output_text

            stream = await client.responses.create(model="default", input="REPLY:" + CALL,
                                                   tools=[WEATHER], stream=True,
                                                   extra_body=STOP)
            kinds, final = [], None
            async for event in stream:
                kinds.append(event.type)
                if event.type == "response.completed":
                    final = event.response
            assert "response.function_call_arguments.delta" in kinds
            assert "response.function_call_arguments.done" in kinds
            call = [item for item in final.output if item.type == "function_call"][0]
            assert json.loads(call.arguments) == {"city": "Paris"}

            async with client.responses.stream(model="default", input="REPLY:" + CALL,
                                               tools=[WEATHER], extra_body=STOP) as helper:
                final = await helper.get_final_response()
            assert [item.type for item in final.output] == ["function_call"]

    run(scenario())


def test_node_failure_and_bad_requests():
    async def scenario():
        async with Harness() as h:
            client = client_of(h)
            stream = await client.responses.create(model="default", input="FAIL", stream=True)
            events = [event async for event in stream]
            assert events[-1].type == "response.failed"
            assert "boom" in events[-1].response.error.message
            with pytest.raises(openai.BadRequestError) as info:
                await client.responses.create(model="default", input="x",
                                              previous_response_id="resp_1")
            assert "previous_response_id" in info.value.body["message"]
            with pytest.raises(openai.NotFoundError):
                await client.responses.create(model="gpt-4o", input="x")

    run(scenario())


# ---- the scheduler ----------------------------------------------------------------------------


@pytest.fixture
def scheduler():
    heads = ScriptedHeads()
    s = Scheduler(heads, replay_keepalive_s=0.1, replay_wait_s=5.0)
    s.bring_up({"a": WHOLE, "b": WHOLE})
    yield s, heads
    s.stop()
    heads.server.stop()


def test_scheduler_replays_a_broken_response_stream(scheduler):
    s, heads = scheduler
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    stream = client.responses.create(model="default", input="FAIL 3 peer_lost BLAME",
                                     stream=True)
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == FULL
    assert events[-1].type == "response.incomplete"  # the heads stop at their length
    assert events[-1].response.output[0].content[0].text == FULL
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    (first_head, first), (second_head, _) = heads.received
    assert first_head != second_head
    assert first["messages"] == [{"role": "user", "content": "FAIL 3 peer_lost BLAME"}]

    r = client.responses.create(model="default", input="FAIL 2 stage_timeout",
                                instructions="sys")
    assert r.output_text == FULL and r.model_extra["metrics"]["failovers"] == 1
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="default", input="x", tools=[{"type": "web_search"}])


# ---- agent loops against `parallax serve` (scripted tiny model) ------------------------------

# The generation prompt tells the two steps apart: `<|call|>` when the user asked, `<|answer|>`
# when a tool result came back; the successor model continues each with its own chain.
TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n<tools>' + (tools | tojson) + '</tools>\n"
    "Call tools as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n' }}"
    "{%- endif %}{%- for m in messages %}"
    "{%- if m.role == 'tool' %}{{- '<|im_start|>tool\n' + m.content + '<|im_end|>\n' }}"
    "{%- elif m.tool_calls %}{{- '<|im_start|>assistant\n<tool_call>' + (m.tool_calls | tojson)"
    " + '</tool_call><|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}"
    "{%- if messages[-1].role == 'tool' %}{{- '<|answer|>' }}{%- else %}{{- '<|call|>' }}"
    "{%- endif %}{%- endif %}")
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|call|>", "<|answer|>"]
SCRIPT = ["<|call|>", "<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
          "\n</tool_call>", "<|im_end|>",
          "<|answer|>", "It", " is", " sunny", " in", " Paris", ".", "<|im_end|>"]
ANSWER = "It is sunny in Paris."
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent-model")
    words = ["user", "assistant", "system", "tool", "\n", " ", "What", " the", " weather", "?",
             "sunny"]
    pieces = [p for p in dict.fromkeys([*words, *SCRIPT]) if p not in SPECIAL]
    tokenizer = save_word_tokenizer(root / "model", pieces, SPECIAL, [], "<|im_end|>", TEMPLATE)
    save_successor_model(root / "model", "llama", tokenizer, SCRIPT, hidden_size=64)
    with serving_tiny_models({"agent": root / "model"}, root) as clients:
        yield clients["agent"].base_url


calls: list[str] = []


@pytest.mark.slow
def test_openai_agents_sdk_runs_a_two_step_tool_task(agent_server):
    import agents

    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=str(agent_server),
                                                        api_key="unused", max_retries=0),
                                     use_for_tracing=False)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather of a city."""
        calls.append(city)
        return "sunny"

    agent = agents.Agent(name="weather", instructions="Answer with the tool.", model="default",
                         tools=[get_weather])
    async def both() -> tuple:
        calls.clear()
        result = await agents.Runner.run(agent, QUESTION)
        first_calls = list(calls)
        calls.clear()
        streamed = agents.Runner.run_streamed(agent, QUESTION)  # stream=True underneath
        kinds = [event.type async for event in streamed.stream_events()]
        return first_calls, result.final_output, list(calls), streamed.final_output, kinds

    first_calls, answer, streamed_calls, streamed_answer, kinds = asyncio.run(
        asyncio.wait_for(both(), 60))
    assert first_calls == ["Paris"] and answer == ANSWER
    assert streamed_calls == ["Paris"] and streamed_answer == ANSWER
    assert "raw_response_event" in kinds


@pytest.mark.slow
def test_pydantic_ai_runs_a_two_step_tool_task(agent_server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=str(agent_server), api_key="unused")
    agent = Agent(OpenAIResponsesModel("default", provider=provider),
                  instructions="Answer with the tool.")

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Weather of a city."""
        calls.append(city)
        return "sunny"

    calls.clear()
    result = agent.run_sync(QUESTION)
    assert calls == ["Paris"] and result.output == ANSWER
