"""Tool-call parsers (parallax/serving/tool_calls.py): every format, split at every boundary."""

from __future__ import annotations

import json

import pytest

from parallax.node.http_server import NodeHttpServer
from parallax.serving.errors import APIError
from parallax.serving.openai_schemas import completion, parse_chat_request
from parallax.serving.tool_calls import (
    HarmonyToolParser,
    HermesToolParser,
    Llama3ToolParser,
    MiniMaxToolParser,
    MistralToolParser,
    ToolCall,
    ToolCallStage,
    hermes_history,
    tool_format,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]


def split_runs(parser_factory, text: str):
    """Pieces for the text fed whole, one char at a time, and cut at every pair of points."""
    cuts = [[text]]
    cuts.append(list(text))
    for i in range(1, len(text)):
        cuts.append([text[:i], text[i:]])
    for i in range(1, len(text), 7):
        for j in range(i + 1, len(text), 5):
            cuts.append([text[:i], text[i:j], text[j:]])
    for parts in cuts:
        parser = parser_factory()
        pieces = []
        for part in parts:
            pieces.extend(parser.feed(part))
        pieces.extend(parser.flush())
        yield parts, pieces


def summary(pieces):
    """(content text, [(name, arguments)]); the content never precedes a marker held back."""
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [(p.name, json.loads(p.arguments)) for p in pieces if isinstance(p, ToolCall)]
    return content, calls


HERMES_TWO = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
              '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
              '</tool_call>\n')

CASES = {
    "hermes two calls, text before": (HermesToolParser, HERMES_TWO, "Let me check.", CALLS),
    "hermes no call": (HermesToolParser, "It is <b>Paris</b> < tool", "It is <b>Paris</b> < tool",
                       []),
    "hermes malformed json": (HermesToolParser,
                              'A <tool_call>{"name": get_weather}</tool_call> B',
                              'A<tool_call>{"name": get_weather}</tool_call> B', []),
    "hermes unclosed at the end": (HermesToolParser,
                                   '<tool_call>{"name": "get_weather", "arguments": '
                                   '{"city": "Paris"}}', "", CALLS[:1]),
    "hermes unclosed, broken": (HermesToolParser, 'x <tool_call>{"name": "get_w',
                                'x<tool_call>{"name": "get_w', []),
    "llama3 two calls": (Llama3ToolParser,
                         '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                         '{"name": "get_time", "parameters": {"zone": "CET"}}', "", CALLS),
    "llama3 python_tag": (Llama3ToolParser,
                          '<|python_tag|>{"type": "function", "name": "get_weather", '
                          '"parameters": {"city": "Paris"}}', "", CALLS[:1]),
    "llama3 plain json answer": (Llama3ToolParser, '{"a": 1} is JSON', '{"a": 1} is JSON', []),
    "llama3 text first": (Llama3ToolParser, 'Say {"name": "x"}', 'Say {"name": "x"}', []),
    "llama3 malformed": (Llama3ToolParser, '{"name": "get_weather", "parameters": {"city": Paris}',
                         '{"name": "get_weather", "parameters": {"city": Paris}', []),
    "mistral array": (MistralToolParser,
                      'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                      '{"name": "get_time", "arguments": {"zone": "CET"}}]', "Sure.", CALLS),
    "mistral bare array": (MistralToolParser,
                           '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', "",
                           CALLS[:1]),
    "mistral v11": (MistralToolParser,
                    '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]'
                    '{"zone": "CET"}', "", CALLS),
    "mistral list answer": (MistralToolParser, "[1, 2] are numbers", "[1, 2] are numbers", []),
    "mistral malformed": (MistralToolParser, '[TOOL_CALLS][{"name": 5}] ok',
                          '[TOOL_CALLS][{"name": 5}] ok', []),
    "minimax two invokes": (
        lambda: MiniMaxToolParser([WEATHER, TIME]),
        'Checking.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">'
        'Paris</parameter>\n</invoke>\n<invoke name="get_time">\n<parameter name="zone">CET'
        '</parameter>\n</invoke>\n</minimax:tool_call>', "Checking.", CALLS),
    "minimax typed by schema": (
        lambda: MiniMaxToolParser([WEATHER]),
        '<minimax:tool_call><invoke name="get_weather"><parameter name="city">12</parameter>'
        '<parameter name="days">3</parameter></invoke></minimax:tool_call>', "",
        [("get_weather", {"city": "12", "days": 3})]),
    "minimax malformed": (lambda: MiniMaxToolParser([WEATHER]),
                          "<minimax:tool_call>oops</minimax:tool_call>",
                          "<minimax:tool_call>oops</minimax:tool_call>", []),
}


@pytest.mark.parametrize("case", CASES)
def test_parser_at_every_split(case):
    factory, text, content, calls = CASES[case]
    for parts, pieces in split_runs(factory, text):
        assert summary(pieces) == (content, calls), parts


@pytest.mark.parametrize("text, marker", [
    ("Hi <tool_call>", "<tool_call>"), ("Hi [TOOL_CALLS]", "[TOOL_CALLS]"),
    ("Hi <minimax:tool_call>", "<minimax:tool_call>")])
def test_a_marker_prefix_is_held_back(text, marker):
    parser = {"<tool_call>": HermesToolParser, "[TOOL_CALLS]": MistralToolParser,
              "<minimax:tool_call>": MiniMaxToolParser}[marker]()
    sent = ""
    for ch in text:
        sent += "".join(p for p in parser.feed(ch) if isinstance(p, str))
        assert "<" not in sent[3:] and "[" not in sent[3:]  # nothing of the marker leaks
    assert sent == "Hi"


def test_llama3_holds_a_json_start_then_releases_plain_text():
    parser = Llama3ToolParser()
    assert parser.feed(' {"na') == []
    assert parser.feed('me": "get_weather", "parameters": {}}') != []
    parser = Llama3ToolParser()
    assert parser.feed("{") == []
    assert parser.feed("x") == ["{x"]


HARMONY = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
           "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
           '{"city": "Paris"}<|call|>')


def test_harmony_call_at_every_split():
    text = HARMONY
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 9):
            parser = HarmonyToolParser()
            stage = ToolCallStage(None, parser)
            reasoning, pieces = "", []
            for part in (text[:i], text[i:j], text[j:]):
                r, c = parser.feed(part)
                reasoning += r
                pieces.extend(stage.feed(c))
            r, c = parser.flush()
            pieces.extend(stage.feed(c, final=True))
            assert reasoning + r == "Need the weather."
            assert summary(pieces) == ("", CALLS[:1])


def test_harmony_malformed_call_is_text():
    parser = HarmonyToolParser()
    parser.feed("<|channel|>commentary to=functions.get_weather<|message|>{oops<|call|>")
    parser.flush()
    assert parser.take_calls() == ["{oops"]


def test_stage_numbers_calls_and_honours_parallel_false():
    for parallel, names in ((True, ["get_weather", "get_time"]), (False, ["get_weather"])):
        stage = ToolCallStage(HermesToolParser(), parallel=parallel)
        pieces = stage.feed(HERMES_TWO, final=True)
        calls = [p for p in pieces if isinstance(p, ToolCall)]
        assert [c.name for c in calls] == names
        assert [c.index for c in calls] == list(range(len(names)))
        assert all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("model_type, template, renders, fmt", [
    ("llama", "{{ messages }}", False, "hermes"),  # SmolLM2: no tools in the template
    ("qwen3", "{{ tools }}<tool_call>", True, "hermes"),
    ("llama", "{{ tools }}<|python_tag|>", True, "llama3"),
    ("mistral", "{{ tools }}[TOOL_CALLS]", True, "mistral"),
    ("minimax_m2", "{{ tools }}", True, "minimax"),
    ("gpt_oss", "{{ tools }}", True, "harmony"),
])
def test_format_from_family_and_template(model_type, template, renders, fmt):
    assert tool_format(model_type, template, renders) == fmt


# ---------------------------------------------------------------- request side


def chat(**fields):
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}], **fields}


def test_tools_parse_and_named_choice():
    req = parse_chat_request(chat(tools=[WEATHER, TIME], parallel_tool_calls=False,
                                  tool_choice={"type": "function",
                                               "function": {"name": "get_time"}}))
    assert req.uses_tools and not req.parallel_tool_calls
    assert (req.tool_choice, req.tool_choice_name) == ("function", "get_time")
    assert [t["function"]["name"] for t in req.template_tools()] == ["get_time"]
    none = parse_chat_request(chat(tools=[WEATHER], tool_choice="none"))
    assert not none.uses_tools and none.template_tools() == []
    assert parse_chat_request(chat()).tool_choice == "none"
    assert parse_chat_request(chat(tools=[WEATHER])).tool_choice == "auto"


@pytest.mark.parametrize("fields, words", [
    ({"tools": {"type": "function"}}, ["'tools' must be an array"]),
    ({"tools": [{"type": "retrieval"}]}, ["tools[0].type", "function"]),
    ({"tools": [{"type": "function"}]}, ["tools[0].function"]),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     ["tools[0].function.name"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     ["tools[0].function.parameters"]),
    ({"tools": [WEATHER, WEATHER]}, ["tools[1].function.name", "two tools"]),
    ({"tools": [WEATHER], "tool_choice": "always"}, ["'tool_choice'", "required"]),
    ({"tool_choice": "required"}, ["no 'tools'"]),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     ["'nope'", "not one of 'tools'"]),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, ["'parallel_tool_calls'", "boolean"]),
    ({"messages": [{"role": "tool", "content": "42"}]}, ["messages[0].tool_call_id"]),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}]},
     ["messages[0].tool_calls[0].function"]),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     ["messages[0].tool_calls", "assistant"]),
])
def test_bad_tool_fields_are_400(fields, words):
    with pytest.raises(APIError) as info:
        parse_chat_request(chat(**fields))
    assert info.value.status == 400
    assert all(w in info.value.message for w in words), info.value.message


def test_history_with_calls_reaches_the_template_as_objects():
    req = parse_chat_request({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
    messages = req.template_messages()
    assert messages[1]["content"] == ""
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2]["tool_call_id"] == "call_1"
    text = hermes_history(messages)
    assert text[1]["content"].startswith("<tool_call>\n{\"name\": \"get_weather\"")
    assert text[2] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


def test_completion_with_calls_has_null_content():
    call = ToolCall("get_weather", '{"city": "Paris"}', "call_x").to_dict()
    body = completion("r", "m", 0, "", None, "tool_calls", {}, None, [call])
    message = body["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"] == [call]
    assert body["choices"][0]["finish_reason"] == "tool_calls"


class _Template:
    """A tokenizer stand-in whose template renders tools or not."""

    def __init__(self, renders: bool) -> None:
        self.renders = renders
        self.chat_template = "{{ tools }}" if renders else "{{ messages }}"

    def apply_chat_template(self, messages, tools=None, tokenize=False,
                            add_generation_prompt=True, **kwargs):
        head = f"TOOLS={json.dumps(tools)}|" if tools and self.renders else ""
        return head + "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def encode(self, text, add_special_tokens=False):
        return [1] * len(text)


@pytest.mark.parametrize("renders", [True, False])
def test_render_prompt_gives_tools_to_the_template_or_the_hermes_prompt(renders):
    from parallax.config import ServeConfig

    frontend = NodeHttpServer(ServeConfig(model="fake"), None, "fake",
                              tokenizer=_Template(renders))
    req = parse_chat_request(chat(tools=[WEATHER], tool_choice="required"))
    text, _ = frontend.render_prompt(req)
    assert frontend.template_renders_tools() is renders
    assert ("TOOLS=" in text) is renders
    assert ("<tool_call>" in text) is not renders  # the Hermes instructions
    assert text.count("get_weather") == 1 and "must call" in text
    none = frontend.render_prompt(parse_chat_request(chat(tools=[WEATHER], tool_choice="none")))
    assert "get_weather" not in none[0]
    frontend._render_pool.shutdown()
