"""Grammars (llguidance Lark) for tool calls and for answers after a reasoning block.

Built by the frontend from the request and the model (parallax/serving/structured.py builds the
plain `response_format` ones): the stage that samples constrains decoding to them.

- Forced calls (`tool_choice: "required"` or a named function): the answer is the model's
  tool-call markup around arguments that validate against the tool's `parameters`, one call or
  several (`parallel_tool_calls`).
- `tool_choice: "auto"`: a *lazy* grammar. The model writes free text (or, with a
  `response_format`, the JSON answer) until it writes the family's call marker; from there the
  call is constrained like a forced one. Free text never contains the marker unconstrained: the
  lazy lexeme `TEXT "<marker>"` ends at the first marker, after which only a call may follow.
- Reasoning: when the request reasons (a thinking family with thinking on, or a prompt that
  opened `<think>`), the grammar first allows the family's thinking block (`<think>…</think>`,
  or a harmony `analysis` message), then the constrained answer.

Formats (those `serving/tool_calls.py` parses): `hermes` (`<tool_call>\\n{…}\\n</tool_call>`,
parallel calls separated by a newline), `llama3` (bare `{"name", "parameters"}` objects, `"; "`
between them; free text may not start with `{`), `mistral` (`[TOOL_CALLS][{…}, …]`, calls only
at the start of the answer, as the parser reads them when the marker is a dropped special token),
`minimax` (`<minimax:tool_call>` with `<invoke>` / `<parameter>` XML; a string parameter is
raw text without `<`, checked against its `enum` when it has one, other types are JSON), `harmony`
(gpt-oss: `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{…}`, one call).

A marker that is one added token of the tokenizer (`<tool_call>` in Qwen's, `[TOOL_CALLS]` in
Mistral's, harmony's `<|channel|>`…) may be written as that token or spelled out: llguidance
treats every added token as special, outside any text terminal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from parallax.serving.structured import JSON_OPTIONS, check_grammar

PARAMETER_END = "</parameter>\n"
# a call the model starts on its own keeps its own JSON spacing, one blank at most between
# tokens (forced ones are compact): nobody pads an answer with whitespace until max_tokens
FLEXIBLE_JSON = {"whitespace_flexible": True, "whitespace_pattern": "[ \\n]?"}
TOOL_FORMATS = ("hermes", "llama3", "mistral", "minimax", "harmony")
THINKING_MODES = ("none", "open", "optional", "harmony")


@dataclass(frozen=True)
class GrammarContext:
    """What the model and the prompt tell the grammar: the tokenizer's added tokens (marker →
    id) and where reasoning stands: `none`, `open` (the prompt opened `<think>`), `optional`
    (the model may open one first), `harmony` (an `analysis` message may come first)."""

    added: Mapping[str, int] = field(default_factory=dict)
    thinking: str = "none"


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Lark:
    """A Lark grammar under construction: named rules, markers as tokens or spelled."""

    def __init__(self, ctx: GrammarContext) -> None:
        self.ctx = ctx
        self.rules: dict[str, str] = {"TEXT": "/(?s:.*)/"}

    def add(self, name: str, body: str) -> str:
        self.rules.setdefault(name, body)
        return name

    def mark(self, text: str) -> str:
        """`text` as a literal, or its added token (either one) when it is one."""
        token = self.ctx.added.get(text)
        return _q(text) if token is None else f"(<[{token}]> | {_q(text)})"

    def until(self, name: str, marker: str) -> str:
        """Free text up to and including the first `marker` (a lazy lexeme)."""
        self.add(f"{name}_text[lazy]", f"TEXT {_q(marker)}")
        token = self.ctx.added.get(marker)
        body = f"{name}_text" if token is None else f"{name}_text | TEXT <[{token}]>"
        return self.add(name, body)

    def json(self, name: str, schema: dict[str, Any], flexible: bool = False) -> str:
        options = FLEXIBLE_JSON if flexible else JSON_OPTIONS
        return self.add(name, f"%json {json.dumps({**schema, 'x-guidance': options})}")

    def text(self) -> str:
        start = self.rules.pop("start")
        # no_forcing: text the grammar forces may come as any tokens, not only llguidance's
        # tokenization of it (xgrammar's behaviour too); a model keeps its own token choices
        return "\n".join(['%llguidance {"no_forcing": true}', f"start: {start}",
                          *(f"{k}: {v}" for k, v in self.rules.items())])


def _thinking(g: _Lark) -> str:
    """The reasoning allowed before the answer ("" when none)."""
    mode = g.ctx.thinking
    if mode == "open":
        return g.until("think", "</think>") + " "
    if mode == "optional":
        g.until("think_rest", "</think>")
        return "(" + g.add("think", f"{g.mark('<think>')} think_rest") + ")? "
    if mode == "harmony":
        end = g.until("analysis_rest", "<|end|>")
        g.add("analysis", f"{g.mark('<|channel|>')} \"analysis\" {g.mark('<|message|>')} {end} "
                          f"{g.mark('<|start|>')} \"assistant\"")
        return "analysis? "
    return ""


def _call_schema(tool: dict[str, Any], arguments_key: str) -> dict[str, Any]:
    function = tool["function"]
    return {"type": "object",
            "properties": {"name": {"const": function["name"]},
                           arguments_key: function["parameters"]},
            "required": ["name", arguments_key], "additionalProperties": False}


def _calls_json(g: _Lark, tools: list[dict[str, Any]], key: str, auto: bool) -> str:
    calls = [_call_schema(tool, key) for tool in tools]
    return g.json("call_json", calls[0] if len(calls) == 1 else {"anyOf": calls}, auto)


def _minimax_value(g: _Lark, name: str, schema: Any) -> str:
    schema = schema if isinstance(schema, dict) else {}
    if schema.get("type") == "string":
        enum = schema.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
            return "(" + " | ".join(_q(v) for v in enum) + ")"
        return g.add("RAW_STRING", "/[^<]*/")
    return g.json(name, schema)


def _minimax_invoke(g: _Lark, i: int, tool: dict[str, Any]) -> str:
    function = tool["function"]
    params = function.get("parameters") or {}
    required = set(params.get("required") or [])
    parts = []
    for j, (key, schema) in enumerate((params.get("properties") or {}).items()):
        value = _minimax_value(g, f"value_{i}_{j}", schema)
        opening = _q(f'<parameter name="{key}">')
        part = f"{opening} {value} {_q(PARAMETER_END)}"
        parts.append(part if key in required else f"({part})?")
    head = _q(f'<invoke name="{function["name"]}">\n')
    return g.add(f"invoke_{i}", " ".join([head, *parts, _q("</invoke>\n")]))


def _harmony_call(g: _Lark, tools: list[dict[str, Any]], auto: bool) -> str:
    calls = []
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        args = g.json(f"args_{i}", tool["function"]["parameters"], auto)
        calls.append(f"{g.mark('<|channel|>')} {_q(f'commentary to=functions.{name} ')} "
                     f"{g.mark('<|constrain|>')} \"json\" {g.mark('<|message|>')} {args}")
    return g.add("call", " | ".join(calls))


def _call_parts(g: _Lark, tools: list[dict[str, Any]], fmt: str, parallel: bool,
                auto: bool) -> tuple[str | None, str]:
    """(marker, what follows it up to the last call); llama3's marker is optional."""
    if fmt == "hermes":
        call = _calls_json(g, tools, "arguments", auto)
        # forced: the canonical newlines; a call the model started: its own (a few blanks)
        nl = g.add("SP", "/[ \\t\\n]{0,3}/") if auto else '"\\n"'
        body = g.add("body", f'{nl} {call} {nl} "</tool_call>"')
        more = f' ({nl} {g.mark("<tool_call>")} body)*' if parallel else ""
        return "<tool_call>", body + more
    if fmt == "llama3":
        call = _calls_json(g, tools, "parameters", auto)
        return "<|python_tag|>", call + (f' ("; " {call})*' if parallel else "")
    if fmt == "mistral":
        call = _calls_json(g, tools, "arguments", auto)
        return "[TOOL_CALLS]", f'"[" {call}' + (f' (", " {call})*' if parallel else "") + ' "]"'
    if fmt == "minimax":
        invoke = g.add("invoke", " | ".join(_minimax_invoke(g, i, t) for i, t in enumerate(tools)))
        calls = f"{invoke}+" if parallel else invoke
        return "<minimax:tool_call>", f'"\\n" {calls} "</minimax:tool_call>"'
    raise ValueError(f"tool-call format {fmt!r} has no grammar; one of {TOOL_FORMATS}")


def _answer(g: _Lark, answer_schema: dict[str, Any] | None, harmony: bool) -> str:
    """The non-call answer: free text, or the `response_format` JSON."""
    if answer_schema is None:
        body = "TEXT"
    else:
        body = ("WS " if g.ctx.thinking in ("open", "optional") else "") + \
            g.json("answer_json", answer_schema)
    if harmony:
        return f"{g.mark('<|channel|>')} \"final\" {g.mark('<|message|>')} {body}"
    return body


def tool_call_grammar(tools: list[dict[str, Any]], fmt: str, parallel: bool, *,
                      auto: bool = False, ctx: GrammarContext | None = None,
                      answer_schema: dict[str, Any] | None = None) -> str:
    """The grammar of an answer that calls `tools` in format `fmt`: forced (at least one call;
    several when `parallel`) or, with `auto`, free text (`answer_schema`'s JSON when given) or
    calls. Reasoning first as `ctx.thinking` says."""
    import llguidance

    g = _Lark(ctx or GrammarContext())
    g.add("WS", "/[ \\t\\n]*/")
    think = _thinking(g)
    if fmt == "harmony":
        call = _harmony_call(g, tools, auto)
        g.add("start", think + (f"({_answer(g, answer_schema, True)} | {call})" if auto else call))
        return llguidance.LLMatcher.grammar_from_lark(g.text())
    marker, calls = _call_parts(g, tools, fmt, parallel, auto)
    assert marker is not None
    optional = "? " if fmt == "llama3" else " "
    if not auto:
        g.add("start", f"{think}{'WS ' if think else ''}{g.mark(marker)}{optional}{calls}")
    elif fmt in ("llama3", "mistral"):  # calls only at the start; text cannot look like one
        first = "{" if fmt == "llama3" else "["
        answer = (g.add("FREE", f"/\\s*/ | /\\s*[^\\s\\{first}](?s:.*)/")
                  if answer_schema is None else _answer(g, answer_schema, False))
        g.add("start", f"{think}({answer} | WS {g.mark(marker)}? {calls})")
    else:
        if answer_schema is None:  # text, then the marker: a lazy lexeme
            head = g.until("head", marker)
        else:
            head = g.add("head", f"WS {g.mark(marker)}")
        g.add("start", f"{think}({_answer(g, answer_schema, False)} | {head} {calls})")
    return llguidance.LLMatcher.grammar_from_lark(g.text())


def answer_grammar(schema: dict[str, Any], ctx: GrammarContext, harmony: bool) -> str | None:
    """`response_format`'s JSON after the reasoning `ctx` allows (None: the plain JSON grammar
    does, no reasoning and no harmony channel)."""
    if ctx.thinking == "none" and not harmony:
        return None
    import llguidance

    g = _Lark(ctx)
    g.add("WS", "/[ \\t\\n]*/")
    g.add("start", _thinking(g) + _answer(g, schema, harmony))
    return llguidance.LLMatcher.grammar_from_lark(g.text())


def check_tool_grammar(tools: list[dict[str, Any]], parallel: bool) -> None:
    """400 naming the tool whose `parameters` cannot constrain its calls."""
    for i, tool in enumerate(tools):
        grammar = tool_call_grammar([tool], "hermes", parallel)
        check_grammar(grammar, f"tools[{i}].function.parameters")
