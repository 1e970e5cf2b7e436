"""Tool calls: the prompt side (tools in the template, or a Hermes system prompt) and one
streaming parser per tool-call format, run on the answer text after the reasoning split.

Formats (`make_tool_parser` picks one from the model family and its chat template):

- `hermes`: Hermes / Qwen2.5 / Qwen3 `<tool_call>{"name": …, "arguments": {…}}</tool_call>`,
  also the format every template that does not render `tools` is taught (`hermes_system_prompt`).
- `llama3`: Llama 3.x JSON, `{"name": …, "parameters": {…}}` at the start of the answer (the
  `<|python_tag|>` before it is a special token the detokenizer drops; kept, it is a marker too),
  several calls separated by `;`.
- `mistral`: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`, and the v11 form
  `[TOOL_CALLS]name[ARGS]{…}`; a bare `[{"name": …` array at the start of the answer too (the
  marker is a special token in most Mistral tokenizers).
- `minimax`: MiniMax-M2 `<minimax:tool_call><invoke name="…"><parameter name="…">value
  </parameter>…</invoke>…</minimax:tool_call>` (values typed by the tool's JSON schema).
- `harmony`: GPT-OSS `<|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json
  <|message|>{…}<|call|>`: `HarmonyToolParser` replaces the reasoning `HarmonyParser` (the call
  is a channel message, which that parser drops) and hands its calls to the stage.

A parser's `feed(text)` / `flush()` return a list of pieces: `str` (answer text) and `ToolCall`.
A call is emitted once it is complete (its closing marker, or its JSON closed); text that may
still be the start of a call marker is held back, never leaked into the answer. A call whose body
does not parse is given back as answer text, markers included.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from parallax.serving.reasoning import HarmonyParser

Piece = Any  # str | ToolCall


@dataclass
class ToolCall:
    """One parsed call: the function's name and its arguments as a JSON object text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    index: int = 0  # its place among the request's calls (ToolCallStage sets it)

    def to_dict(self) -> dict[str, Any]:
        """The `message.tool_calls[i]` shape of a non-streaming answer."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def call_deltas(call: ToolCall, merged: bool = False) -> list[dict[str, Any]]:
    """The `delta.tool_calls` entries of one call: id, type and name (arguments "") first, then
    the arguments; `merged` gives one entry with everything (the internal leg)."""
    index = call.index
    head = {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments if merged else ""}}
    if merged:
        return [head]
    return [head, {"index": index, "function": {"arguments": call.arguments}}]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def call_from_json(obj: Any) -> ToolCall | None:
    """A call from a decoded `{"name", "arguments" | "parameters"}` object (None: not a call)."""
    if not isinstance(obj, dict):
        return None
    if obj.get("type") == "function" and isinstance(obj.get("function"), dict):
        obj = obj["function"]  # {"type": "function", "function": {...}}
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, _dumps(args))


def _partial_suffix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


_DECODER = json.JSONDecoder()


def _raw_decode(text: str, start: int = 0) -> tuple[Any, int] | None:
    """Decode one JSON value at `start` (after whitespace); None when it is not complete/valid."""
    while start < len(text) and text[start].isspace():
        start += 1
    try:
        return _DECODER.raw_decode(text, start)
    except json.JSONDecodeError:
        return None


def _could_start(text: str, starts: tuple[str, ...]) -> bool:
    """`text`, whitespace left out, is a proper prefix of one of `starts` (hold it back)."""
    compact = "".join(text.split())
    return any(s.startswith(compact) and len(compact) < len(s) for s in starts)


class _Malformed(Exception):
    """The call body up to `end` does not parse: it goes out as answer text."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


class MarkerToolParser:
    """Answer text until a start marker; then a call body until `_body` says it is complete.

    Subclasses set `markers` and implement `_body(body, final)`: None (incomplete), or
    `(calls, consumed)` where `body[:consumed]` (its end marker included) is used up; raise
    `_Malformed(end)` when `body[:end]` is not a call. Whitespace around calls is dropped.
    """

    markers: tuple[str, ...] = ()
    name = ""

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.tools = tools or []
        self._buffer = ""
        self._marker: str | None = None  # inside a call body that followed this marker
        self._after_call = False  # drop the whitespace that follows a call
        self._started = False  # some answer text or a call went out already

    # ---- hooks ------------------------------------------------------------------------

    def _body(self, body: str, final: bool) -> tuple[list[ToolCall], int] | None:
        raise NotImplementedError

    def _bare_start(self, text: str) -> int | None:
        """Where a call without a marker starts (formats that allow one); None: none here."""
        return None

    def _bare_hold(self, text: str) -> bool:
        """The text so far could still become a bare call (hold it all back)."""
        return False

    # ---- the loop -----------------------------------------------------------------------

    def _find_marker(self, text: str) -> tuple[int, str] | None:
        found = [(text.find(m), m) for m in self.markers if m in text]
        return min(found) if found else None

    def _hold(self, text: str) -> int:
        hold = max((_partial_suffix_len(text, m) for m in self.markers), default=0)
        rest = text[: len(text) - hold]
        return hold + len(rest) - len(rest.rstrip())

    def _text(self, out: list[Piece], text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        if text:
            self._started = True
            if out and isinstance(out[-1], str):
                out[-1] += text
            else:
                out.append(text)

    def _run(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while self._buffer:
            if self._marker is None:
                if not self._started or self._after_call:
                    bare = self._bare_start(self._buffer)
                    if bare is not None:
                        self._marker = ""
                        self._buffer = self._buffer[bare:]
                        continue
                    if not final and self._bare_hold(self._buffer):
                        break
                found = self._find_marker(self._buffer)
                if found is not None:
                    idx, marker = found
                    self._text(out, self._buffer[:idx].rstrip())
                    self._marker, self._buffer = marker, self._buffer[idx + len(marker):]
                    continue
                hold = 0 if final else self._hold(self._buffer)
                self._text(out, self._buffer[: len(self._buffer) - hold])
                self._buffer = self._buffer[len(self._buffer) - hold:]
                break
            try:
                done = self._body(self._buffer, final)
            except _Malformed as exc:
                self._text(out, self._marker + self._buffer[: exc.end])
                self._buffer, self._marker = self._buffer[exc.end:], None
                self._started = True
                continue
            if done is None:
                if final:  # an unfinished call: give it back as text
                    self._text(out, self._marker + self._buffer)
                    self._buffer, self._marker = "", None
                break
            calls, consumed = done
            out.extend(calls)
            self._buffer, self._marker = self._buffer[consumed:], None
            self._after_call = self._started = True
        return out

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        return self._run(final=False)

    def flush(self) -> list[Piece]:
        return self._run(final=True)


class HermesToolParser(MarkerToolParser):
    """`<tool_call>{"name": …, "arguments": {…}}</tool_call>` (one call per tag)."""

    name = "hermes"
    markers = ("<tool_call>",)
    END = "</tool_call>"

    def _body(self, body: str, final: bool) -> tuple[list[ToolCall], int] | None:
        idx = body.find(self.END)
        if idx == -1 and not final:
            return None
        inner, consumed = (body, len(body)) if idx == -1 else (body[:idx], idx + len(self.END))
        decoded = _raw_decode(inner)
        call = call_from_json(decoded[0]) if decoded and not inner[decoded[1]:].strip() else None
        if call is None:
            if idx == -1:
                return None  # final and unfinished: the caller gives it back as text
            raise _Malformed(consumed)
        return [call], consumed


class Llama3ToolParser(MarkerToolParser):
    """Llama 3.x JSON calls at the start of the answer: `{"name", "parameters"}`, `;`-separated;
    `<|python_tag|>` (when the detokenizer keeps it) is a marker."""

    name = "llama3"
    markers = ("<|python_tag|>",)
    STARTS = ('{"name":', '{"type":')

    def _bare_start(self, text: str) -> int | None:
        body = text.lstrip().lstrip(";").lstrip() if self._after_call else text.lstrip()
        if re.match(r'\{\s*"(?:name|type)"\s*:', body):
            return len(text) - len(body)
        return None

    def _bare_hold(self, text: str) -> bool:
        body = text.lstrip().lstrip(";") if self._after_call else text
        return _could_start(body, self.STARTS)

    def _body(self, body: str, final: bool) -> tuple[list[ToolCall], int] | None:
        decoded = _raw_decode(body)
        if decoded is None:
            if final:
                raise _Malformed(len(body))
            return None  # the JSON is not closed yet
        call = call_from_json(decoded[0])
        if call is None:
            raise _Malformed(decoded[1])
        return [call], decoded[1]  # more calls may follow after a `;` (a bare start)


class MistralToolParser(MarkerToolParser):
    """`[TOOL_CALLS][{…}, …]`, `[TOOL_CALLS]name[ARGS]{…}`, or a bare `[{"name"` array first."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    ARGS = "[ARGS]"

    def _bare_start(self, text: str) -> int | None:
        body = text.lstrip()
        if re.match(r'\[\s*\{\s*"name"', body):
            return len(text) - len(body)
        return None

    def _bare_hold(self, text: str) -> bool:
        return _could_start(text, ('[{"name":',))

    def _body(self, body: str, final: bool) -> tuple[list[ToolCall], int] | None:
        stripped = body.lstrip()
        if not stripped:
            if final:
                raise _Malformed(len(body))
            return None
        if stripped.startswith("["):
            decoded = _raw_decode(body)
            if decoded is None:
                if final:
                    raise _Malformed(len(body))
                return None
            items = decoded[0] if isinstance(decoded[0], list) else [decoded[0]]
            calls = [call_from_json(item) for item in items]
            if not calls or any(c is None for c in calls):
                raise _Malformed(decoded[1])
            return calls, decoded[1]
        idx = body.find(self.ARGS)  # v11: name[ARGS]{json}
        if idx == -1:
            name_part = body[: len(body) - _partial_suffix_len(body, self.ARGS)]
            if final or not re.fullmatch(r"\s*[\w.\-]*", name_part):
                raise _Malformed(len(body))
            return None
        name = body[:idx].strip()
        decoded = _raw_decode(body, idx + len(self.ARGS))
        if decoded is None:
            if final:
                raise _Malformed(len(body))
            return None
        call = call_from_json({"name": name, "arguments": decoded[0]})
        if call is None:
            raise _Malformed(decoded[1])
        return [call], decoded[1]


class MiniMaxToolParser(MarkerToolParser):
    """MiniMax-M2 XML calls; parameter values are typed by the tool's JSON schema."""

    name = "minimax"
    markers = ("<minimax:tool_call>",)
    END = "</minimax:tool_call>"
    _INVOKE = re.compile(r'<invoke\s+name="([^"]+)"\s*>(.*?)</invoke>', re.S)
    _PARAM = re.compile(r'<parameter\s+name="([^"]+)"\s*>(.*?)</parameter>', re.S)

    def _param_types(self, name: str) -> dict[str, Any]:
        for tool in self.tools:
            function = tool.get("function") or {}
            if function.get("name") == name:
                props = (function.get("parameters") or {}).get("properties") or {}
                return {k: (v or {}).get("type") for k, v in props.items() if isinstance(v, dict)}
        return {}

    @staticmethod
    def _value(raw: str, kind: Any) -> Any:
        value = raw.strip("\n")
        kinds = set(kind) if isinstance(kind, list) else {kind}
        if kinds <= {"string", None} and kind is not None:
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value

    def _body(self, body: str, final: bool) -> tuple[list[ToolCall], int] | None:
        idx = body.find(self.END)
        if idx == -1:
            return None
        calls = []
        for name, inner in self._INVOKE.findall(body[:idx]):
            types = self._param_types(name)
            args = {key: self._value(raw, types.get(key))
                    for key, raw in self._PARAM.findall(inner)}
            calls.append(ToolCall(name, _dumps(args)))
        if not calls:
            raise _Malformed(idx + len(self.END))
        return calls, idx + len(self.END)


class NoToolParser:
    """`tool_choice: "none"` or no tools: everything is answer text."""

    name = "none"

    def feed(self, text: str) -> list[Piece]:
        return [text] if text else []

    def flush(self) -> list[Piece]:
        return []


# ---------------------------------------------------------------- GPT-OSS harmony

_RECIPIENT_RE = re.compile(r"to=functions\.([^\s<]+)")


class HarmonyToolParser(HarmonyParser):
    """`HarmonyParser` that keeps `to=functions.NAME` messages as calls (`take_calls`)."""

    def __init__(self, channel: str | None = None) -> None:
        super().__init__(channel)
        self._call_name: str | None = None
        self._call_parts: list[str] = []
        self._calls: list[Piece] = []

    @classmethod
    def from_parser(cls, parser: HarmonyParser) -> HarmonyToolParser:
        """The same state as a fresh `parser` (make_reasoning_parser's choice of channel)."""
        out = cls()
        out.__dict__.update({k: v for k, v in parser.__dict__.items()})
        return out

    def section_of_header(self, header: str) -> str | None:  # type: ignore[override]
        self._end_call()
        m = _RECIPIENT_RE.search(header)
        if m is not None:
            self._call_name = m.group(1)
            return "tool"
        return HarmonyParser.section_of_header(header)

    def _emit(self, out: dict[str, list[str]], text: str) -> None:
        if self._section == "tool":
            self._call_parts.append(text)
        else:
            super()._emit(out, text)

    def _end_call(self) -> None:
        if self._call_name is None:
            return
        body = "".join(self._call_parts)
        self._call_name, name, self._call_parts = None, self._call_name, []
        decoded = _raw_decode(body)
        call = None
        if decoded is not None and not body[decoded[1]:].strip():
            call = call_from_json({"name": name, "arguments": decoded[0]})
        self._calls.append(call if call is not None else body)

    def feed(self, text: str) -> tuple[str, str]:
        reasoning, content = super().feed(text)
        if self._state != "body":
            self._end_call()
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        if self._section == "tool":
            self._emit({}, self._buffer)
            self._buffer = ""
        reasoning, content = super().flush()
        self._end_call()
        return reasoning, content

    def take_calls(self) -> list[Piece]:
        """Calls finished since the last call (a body that did not parse: its text)."""
        calls, self._calls = self._calls, []
        return calls


# ---------------------------------------------------------------- selection and the stage

PARSERS: dict[str, Callable[..., Any]] = {
    "hermes": HermesToolParser, "llama3": Llama3ToolParser, "mistral": MistralToolParser,
    "minimax": MiniMaxToolParser,
}
MISTRAL_MODEL_TYPES = frozenset({"mistral", "mixtral", "ministral", "mistral3", "pixtral"})


def tool_format(model_type: str, chat_template: str, renders_tools: bool = True) -> str:
    """The tool-call format of a model: family first, then the markers its template uses.
    A template that does not render tools gets the Hermes prompt, hence the Hermes format."""
    if not renders_tools:
        return "hermes"
    if model_type == "gpt_oss":
        return "harmony"
    if model_type == "minimax_m2" or "<minimax:tool_call>" in chat_template:
        return "minimax"
    if "[TOOL_CALLS]" in chat_template or (model_type in MISTRAL_MODEL_TYPES
                                           and "<tool_call>" not in chat_template):
        return "mistral"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or model_type == "llama":
        return "llama3"
    return "hermes"


def make_tool_parser(fmt: str, tools: list[dict[str, Any]] | None = None) -> Any:
    """A fresh parser for a format from `tool_format` (harmony: None, see HarmonyToolParser)."""
    factory = PARSERS.get(fmt)
    return factory(tools) if factory is not None else None


class ToolCallStage:
    """One request's tool-call stage after the reasoning split: answer text → text and calls.

    `parser` parses the answer text (None: text passes through); `harmony` is the request's
    `HarmonyToolParser` whose calls are collected after each feed. Without `parallel`, calls
    after the first one are dropped. `num_calls` counts the calls that went out.
    """

    def __init__(self, parser: Any = None, harmony: HarmonyToolParser | None = None,
                 parallel: bool = True) -> None:
        self.parser = parser
        self.harmony = harmony
        self.parallel = parallel
        self.num_calls = 0

    def _keep(self, pieces: list[Piece]) -> list[Piece]:
        out = []
        for piece in pieces:
            if isinstance(piece, ToolCall):
                if self.num_calls and not self.parallel:
                    continue
                piece.index = self.num_calls
                self.num_calls += 1
            elif not piece:
                continue
            out.append(piece)
        return out

    def feed(self, content: str, final: bool = False) -> list[Piece]:
        pieces: list[Piece] = []
        if self.parser is None:
            if content:
                pieces.append(content)
        else:
            if content:
                pieces.extend(self.parser.feed(content))
            if final:
                pieces.extend(self.parser.flush())
        if self.harmony is not None:
            pieces.extend(self.harmony.take_calls())
        return self._keep(pieces)


# ---------------------------------------------------------------- the prompt side

HERMES_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def hermes_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The tools and the `<tool_call>` format, for templates that do not render `tools`."""
    return HERMES_PROMPT.format(tools="\n".join(_dumps(t) for t in tools))


def choice_instruction(tool_choice: str, name: str | None, parallel: bool) -> str:
    """What the system prompt adds for `required`, a named function, or no parallel calls."""
    parts = []
    if tool_choice == "required":
        parts.append("You must call at least one of the functions; answer with function "
                     "calls only.")
    elif tool_choice == "function":
        parts.append(f"You must call the function `{name}`; answer with that call only.")
    if not parallel and tool_choice != "none":
        parts.append("Call at most one function in this answer.")
    return " ".join(parts)


def add_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` appended to the first system message, or a new system message first."""
    if not text:
        return messages
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        old = first.get("content") or ""
        first["content"] = f"{old}\n\n{text}" if old else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def hermes_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call history as text, for templates that know nothing of tools: an assistant's
    calls become `<tool_call>` blocks, tool results `<tool_response>` blocks in a user turn."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            blocks = []
            for call in message["tool_calls"]:
                function = call.get("function") or {}
                blocks.append("<tool_call>\n" + _dumps(
                    {"name": function.get("name"), "arguments": function.get("arguments")})
                    + "\n</tool_call>")
            text = "\n".join(filter(None, [message.get("content") or "", *blocks]))
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].pop("_tool", False):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block,
                           "_tool": True}
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append(message)
    for message in out:
        message.pop("_tool", None)
    return out
