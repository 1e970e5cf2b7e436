"""Tool calls end to end: `parallax serve` on scripted tiny models that write each family's markup.

The models are successor models (tests/tiny_models.py, as in tests/test_reasoning_serve.py): the
real engine decodes a fixed token chain, so the server gets the family's raw tool-call markup
token by token, markers split across tokens. The official `openai` client sends `tools=` and
reads the answers, non-streaming and streaming (its `ChatCompletionStreamState` accumulates the
`delta.tool_calls`): the calls must be exact, their arguments JSON, `finish_reason`
`tool_calls`, and nothing of the markup in `content`.

- hermes: a SmolLM2-style ChatML template that does not render `tools` (llama family): the server
  puts the tools and the `<tool_call>` format in a system message; the model writes text, then two
  `<tool_call>` blocks.
- llama3: `<|python_tag|>` (a special token the detokenizer drops) and a JSON call.
- mistral: `[TOOL_CALLS]` split across two tokens, then a JSON array of two calls.
- minimax: a qwen3-style model with the MiniMax template: `<think>…</think>` then a
  `<minimax:tool_call>` block; the integer parameter is typed by the schema.
- gpt_oss: harmony, an analysis message then `commentary to=functions.get_weather … <|call|>`.
"""

from __future__ import annotations

import json

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from processes import serving_tiny_models
from tiny_models import save_successor_model, save_word_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object",
                                       "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WORDS = ["user", "assistant", "system", "\n", "\n\n", " ", "What", " is", " the", " weather",
         " in", " Paris", "?"]
PARIS = ("get_weather", {"city": "Paris"})
CET = ("get_time", {"zone": "CET"})

CHATML = (  # SmolLM2's template in essence: no `tools` anywhere
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
LLAMA3 = (
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "Respond with {\"name\": ..., \"parameters\": ...}' + (tools | tojson) + '<|eot_id|>' }}"
    "{%- endif %}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{#- <|python_tag|> starts a call #}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}")
MISTRAL = (
    "{%- if tools %}{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}"
    "{%- endif %}{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '[INST]' + message.content + '[/INST]' }}"
    "{%- elif message.tool_calls %}{{- '[TOOL_CALLS]' + (message.tool_calls | tojson) }}"
    "{%- else %}{{- message.content }}{%- endif %}{%- endfor %}")
MINIMAX = (
    "{%- if tools %}{{- '<|im_start|>system\n<tools>' + (tools | tojson) + '</tools>\n"
    "Call tools as <minimax:tool_call><invoke name=...>...</invoke></minimax:tool_call>"
    "<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
HARMONY = (
    "{%- if tools %}{{- '<|start|>developer<|message|># Tools\n' + (tools | tojson) + '<|end|>' }}"
    "{%- endif %}{%- for message in messages %}"
    "{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}")

# family: (model_type, special tokens, added tokens, eos, template, script, extra config,
#          expected content, expected reasoning, expected calls)
FAMILIES = {
    "hermes": ("llama", ["<|im_start|>", "<|im_end|>"], [], "<|im_end|>", CHATML,
               ["\n", "Let me check", ".\n", "<tool_", "call>",
                '\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}',
                "\n</tool_call>", "\n<tool_call>\n",
                '{"name": "get_time", "arguments": {"zone": "CET"}}', "</tool_call>",
                "<|im_end|>"], {}, "Let me check.", None, [PARIS, CET]),
    "llama3": ("llama", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                         "<|python_tag|>", "<|eom_id|>"], [], "<|eom_id|>", LLAMA3,
               ["\n\n", "<|python_tag|>", '{"name": "get_weather", "parameters": ',
                '{"city": "Paris"}}', "<|eom_id|>"], {}, None, None, [PARIS]),
    "mistral": ("mistral", ["[INST]", "[/INST]", "</s>", "[AVAILABLE_TOOLS]",
                            "[/AVAILABLE_TOOLS]"], [], "</s>", MISTRAL,
                ["[/INST]", "[TOOL_", "CALLS]",
                 '[{"name": "get_weather", "arguments": {"city": "Paris"}}, ',
                 '{"name": "get_time", "arguments": {"zone": "CET"}}]', "</s>"], {},
                None, None, [PARIS, CET]),
    "minimax": ("qwen3", ["<|im_start|>", "<|im_end|>"], ["<think>", "</think>"], "<|im_end|>",
                MINIMAX,
                ["\n", "<think>", "Need the weather.", "</think>", "\n\n",
                 "<minimax:tool_call>\n", '<invoke name="get_weather">\n',
                 '<parameter name="city">Paris</parameter>\n',
                 '<parameter name="days">3</parameter>\n', "</invoke>\n",
                 "</minimax:tool_call>", "<|im_end|>"], {},
                None, "Need the weather.", [("get_weather", {"city": "Paris", "days": 3})]),
    "gpt_oss": ("gpt_oss", ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>",
                            "<|return|>"], [], "<|call|>", HARMONY,
                ["assistant", "<|channel|>analysis<|message|>", "Need the weather.", "<|end|>",
                 "<|start|>assistant<|channel|>commentary to=functions.get_weather "
                 "<|constrain|>json<|message|>", '{"city": "Paris"}', "<|call|>"],
                {"rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}},
                None, "Need the weather.", [PARIS]),
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One `parallax serve` per family, started together; yields {family: openai client}."""
    root = tmp_path_factory.mktemp("tool-models")
    for family, (model_type, special, added, eos, template, script, extra, *_) in \
            FAMILIES.items():
        path = root / family
        pieces = [p for p in dict.fromkeys([*WORDS, *script]) if p not in special + added]
        tokenizer = save_word_tokenizer(path, pieces, special, added, eos, template)
        save_successor_model(path, model_type, tokenizer, script, hidden_size=64, **extra)
    with serving_tiny_models({family: root / family for family in FAMILIES}, root) as clients:
        yield clients


def calls_of(message) -> list[tuple[str, dict]]:
    out = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_")
        out.append((call.function.name, json.loads(call.function.arguments)))
    return out


MARKUP = ("<tool_call>", "</tool_call>", "TOOL_CALLS", "<minimax", "<invoke", "<|", "{\"name\"")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_non_streaming_answer_carries_the_calls(servers, family):
    *_, content, reasoning, calls = FAMILIES[family]
    r = servers[family].chat.completions.create(model="default", messages=QUESTION, tools=TOOLS,
                                                temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert calls_of(choice.message) == calls
    assert choice.message.content == content
    assert (choice.message.model_extra or {}).get("reasoning_content") == reasoning
    assert len({c.id for c in choice.message.tool_calls}) == len(calls)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_stream_accumulates_into_the_calls(servers, family):
    *_, content, reasoning, calls = FAMILIES[family]
    state = ChatCompletionStreamState(input_tools=TOOLS)
    stream = servers[family].chat.completions.create(model="default", messages=QUESTION,
                                                     tools=TOOLS, temperature=0, stream=True)
    texts, reasoning_parts, first_entries = [], [], []
    for chunk in stream:
        state.handle_chunk(chunk)
        delta = chunk.choices[0].delta
        if delta.content:
            texts.append(delta.content)
        if (delta.model_extra or {}).get("reasoning_content"):
            reasoning_parts.append(delta.model_extra["reasoning_content"])
        for entry in delta.tool_calls or []:
            if entry.id is not None:  # the first entry of a call: id, type, name
                assert entry.type == "function" and entry.function.name
                first_entries.append(entry.index)
    final = state.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert calls_of(choice.message) == calls
    assert first_entries == list(range(len(calls)))
    assert "".join(texts) == (content or "")
    assert not any(mark in "".join(texts) for mark in MARKUP)
    assert ("".join(reasoning_parts) or None) == reasoning


@pytest.mark.slow
def test_tool_choice_none_leaves_the_markup_as_text(servers):
    r = servers["hermes"].chat.completions.create(model="default", messages=QUESTION,
                                                  tools=TOOLS, tool_choice="none",
                                                  temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert "<tool_call>" in choice.message.content


@pytest.mark.slow
def test_a_tool_history_renders_and_no_tools_means_no_parsing(servers):
    """The second step of an agent loop: the call and its result go back in."""
    messages = [*QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for family in ("hermes", "llama3"):
        r = servers[family].chat.completions.create(model="default", messages=messages,
                                                    tools=TOOLS, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls"
    plain = servers["mistral"].chat.completions.create(model="default", messages=QUESTION,
                                                       temperature=0)
    assert plain.choices[0].finish_reason == "stop"
    assert plain.choices[0].message.content.startswith("[TOOL_CALLS][{")


@pytest.mark.slow
def test_bad_tools_are_400(servers):
    with pytest.raises(openai.BadRequestError) as info:
        servers["hermes"].chat.completions.create(
            model="default", messages=QUESTION, tools=[{"type": "function", "function": {}}])
    assert "tools[0].function.name" in info.value.body["message"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["minimax", "gpt_oss", "mistral"])
def test_forced_call_follows_the_family_format_and_its_reasoning(servers, family):
    """`tool_choice: "required"` decodes under the family's call grammar; a reasoning family
    reasons first (the grammar allows its thinking block): the scripted answer comes out
    unchanged, reasoning and call alike. Without the thinking block in the grammar, or with a
    grammar in another format, the script could not pass the mask."""
    *_, content, reasoning, calls = FAMILIES[family]
    choice = "required" if family != "gpt_oss" else {"type": "function",
                                                     "function": {"name": "get_weather"}}
    r = servers[family].chat.completions.create(model="default", messages=QUESTION, tools=TOOLS,
                                                tool_choice=choice, temperature=0)
    answer = r.choices[0]
    assert answer.finish_reason == "tool_calls"
    assert calls_of(answer.message) == calls
    assert (answer.message.model_extra or {}).get("reasoning_content") == reasoning
    assert not answer.message.content

