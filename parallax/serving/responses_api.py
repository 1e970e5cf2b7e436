"""`POST /v1/responses` (the OpenAI Responses API) on top of the chat path.

`responses_to_chat` translates the request once into a chat body: `instructions` and the `input`
items become messages (`function_call` items an assistant's `tool_calls`, `function_call_output`
items `tool` messages), function `tools` the chat shape, `max_output_tokens` `max_tokens`.
Generation, tool-call parsing, reasoning split and the scheduler's replay are the chat path's;
`ResponsesAdapter` turns its output into a `response` object, or into the typed stream events
(`response.created` ... `response.completed`, each with its `sequence_number`) that the official
client's stream helpers accumulate. Nothing is stored: `previous_response_id`, `store: true`,
`conversation`, `background` and built-in tools are a 400 naming them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from parallax.serving.adapters import typed_encode
from parallax.serving.errors import APIError
from parallax.serving.openai_schemas import (
    CHAT_ID_PREFIX,
    ChatCompletionRequest,
    parse_chat_request,
)

# fields passed to the chat request as they are (ours and OpenAI's sampling extensions)
PASSED_FIELDS = ("model", "stream", "temperature", "top_p", "parallel_tool_calls", "top_k",
                 "min_p", "seed", "stop", "presence_penalty", "frequency_penalty", "priority",
                 "chat_template_kwargs", "ignore_eos", "user", "metadata")
# fields that need state or services this server does not have
UNSUPPORTED = {
    "previous_response_id": "responses are not stored here; send the whole conversation in "
                            "'input'",
    "conversation": "conversations are not stored here; send the whole conversation in 'input'",
    "prompt": "stored prompt templates are not supported; send 'instructions' and 'input'",
    "background": "background responses are not supported; leave 'background' out",
}
TEXT_PARTS = ("input_text", "output_text", "text")
SKIPPED_ITEMS = ("reasoning",)  # earlier turns' reasoning: not fed back to the model
INCOMPLETE = {"length": "max_output_tokens"}


def _bad(message: str) -> APIError:
    return APIError(400, message)


def _text(value: Any, where: str) -> str:
    """A message's content: a string, or text parts (`input_text` / `output_text`)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(f"'{where}' must be a string or an array of text parts")
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            continue
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _bad(f"'{where}[{j}]' must be an input_text or output_text part (only text "
                       f"is supported), got type {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _bad("'input' must be a string or a non-empty array of items")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"'{where}' must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"'{where}.role' must be user, system, developer or assistant, "
                           f"got {role!r}")
            messages.append({"role": role, "content": _text(item.get("content"),
                                                             f"{where}.content")})
        elif kind == "function_call":
            _function_call(messages, item, where)
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"'{where}.call_id' must be a non-empty string")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _text(output, f"{where}.output")})
        elif kind not in SKIPPED_ITEMS:
            raise _bad(f"'{where}.type' {kind!r} is not supported; use message, function_call, "
                       "function_call_output or reasoning items")
    return messages


def _function_call(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    """A `function_call` input item joins the assistant turn before it (or starts one)."""
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str) or (name != "arguments" and not item[name]):
            raise _bad(f"'{where}.{name}' must be a {'' if name == 'arguments' else 'non-empty '}"
                       "string")
    call = {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad("'tools' must be an array")
    tools = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _bad(f"'tools[{i}].type' {kind!r} is not supported: only function tools run "
                       "here (built-in tools such as web_search need OpenAI's servers)")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                    if tool.get(k) is not None}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    kind = value.get("type") if isinstance(value, dict) else type(value).__name__
    raise _bad(f"'tool_choice' {kind!r} is not supported; use auto, none, required or "
               "{\"type\": \"function\", \"name\": ...}")


def _text_format(value: Any) -> dict[str, Any] | None:
    """`text.format` -> the chat `response_format` (None: plain text)."""
    if value is None:
        return None
    fmt = value.get("format") if isinstance(value, dict) else None
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if not isinstance(fmt, dict):
        raise _bad("'text.format' must be an object")
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return {"type": fmt.get("type")}


def responses_to_chat(body: Any) -> dict[str, Any]:
    """A `/v1/responses` body -> the chat body it means; 400 naming what cannot be served."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    for name, why in UNSUPPORTED.items():
        if body.get(name) not in (None, False):
            raise _bad(f"'{name}' is not supported: {why}")
    if body.get("store") is True:
        raise _bad("'store': true is not supported: responses are not stored (no retrieval, "
                   "no 'previous_response_id'); send 'store': false or leave it out")
    if body.get("top_logprobs") not in (None, 0):
        raise _bad("'top_logprobs' is not supported on /v1/responses; use /v1/chat/completions")
    messages = _input_messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string")
        messages.insert(0, {"role": "system", "content": instructions})
    chat: dict[str, Any] = {k: body[k] for k in PASSED_FIELDS if body.get(k) is not None}
    chat["messages"] = messages
    for key, value in (("tools", _tools(body.get("tools"))),
                       ("tool_choice", _tool_choice(body.get("tool_choice"))),
                       ("response_format", _text_format(body.get("text"))),
                       ("max_tokens", body.get("max_output_tokens"))):
        if value is not None:
            chat[key] = value
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(
        body.get("reasoning"), dict) else None
    if isinstance(effort, str):  # gpt-oss style templates read it
        chat["chat_template_kwargs"] = {**chat.get("chat_template_kwargs", {}),
                                        "reasoning_effort": effort}
    if isinstance(body.get("stream_options"), dict):
        chat["stream_options"] = body["stream_options"]
    return chat


def _usage(usage: Any) -> dict[str, Any]:
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


@dataclass
class _Item:
    """An output item being streamed."""

    kind: str  # message | function_call | reasoning
    id: str
    index: int
    text: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""

    def to_dict(self, done: bool) -> dict[str, Any]:
        status = "completed" if done else "in_progress"
        text = "".join(self.text) if done else ""
        if self.kind == "message":
            content = [_output_text(text)] if done else []
            return {"type": "message", "id": self.id, "status": status, "role": "assistant",
                    "content": content}
        if self.kind == "function_call":
            return {"type": "function_call", "id": self.id, "call_id": self.call_id,
                    "name": self.name, "arguments": text, "status": status}
        return {"type": "reasoning", "id": self.id, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}] if done else [],
                "status": status}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class ResponsesAdapter:
    """Chat output -> a `response` object or its typed stream events."""

    request: dict[str, Any]  # the client's /v1/responses body (echoed in the response)
    sequence: int = 0
    response_id: str | None = None
    created_at: int = 0
    model: str = ""
    items: list[_Item] = field(default_factory=list)
    open: _Item | None = None
    calls: dict[int, _Item] = field(default_factory=dict)  # chat tool-call index -> item
    started: bool = False
    failed: dict[str, Any] | None = None  # the final chat chunk said "error"

    def encode(self, event: dict[str, Any]) -> bytes:
        return typed_encode(event)

    # ---- the response object ------------------------------------------------------------

    def _response(self, status: str, output: list[dict[str, Any]], usage: Any = None,
                  finish: str | None = None, error: dict[str, Any] | None = None,
                  metrics: Any = None) -> dict[str, Any]:
        req = self.request
        reason = INCOMPLETE.get(finish or "")
        out: dict[str, Any] = {
            "id": self.response_id, "object": "response", "created_at": self.created_at,
            "status": status, "model": self.model, "output": output,
            "error": error, "incomplete_details": {"reason": reason} if reason else None,
            "instructions": req.get("instructions"), "metadata": req.get("metadata") or {},
            "max_output_tokens": req.get("max_output_tokens"),
            "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "temperature": req.get("temperature"), "top_p": req.get("top_p"),
            "tool_choice": req.get("tool_choice", "auto"), "tools": req.get("tools") or [],
            "text": req.get("text") or {"format": {"type": "text"}},
            "truncation": "disabled", "store": False, "background": False,
            "previous_response_id": None, "reasoning": req.get("reasoning"),
            "usage": _usage(usage) if usage is not None else None,
        }
        if metrics is not None:
            out["metrics"] = metrics
        return out

    def _identify(self, source: dict[str, Any]) -> None:
        if self.response_id is None:
            rid = str(source.get("id") or uuid.uuid4().hex[:24])
            self.response_id = "resp_" + rid.removeprefix(CHAT_ID_PREFIX)
            created = source.get("created")
            self.created_at = created if isinstance(created, int) else int(time.time())
            self.model = str(source.get("model") or "")

    def body(self, completion: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming `chat.completion` -> the `response` object."""
        self._identify(completion)
        choice = completion["choices"][0]
        message = choice.get("message") or {}
        output: list[dict[str, Any]] = []
        suffix = self.response_id.removeprefix("resp_")
        if message.get("reasoning_content"):
            output.append({"type": "reasoning", "id": f"rs_{suffix}", "summary": [],
                           "content": [{"type": "reasoning_text",
                                        "text": message["reasoning_content"]}],
                           "status": "completed"})
        calls = message.get("tool_calls") or []
        if message.get("content") or not calls:
            output.append({"type": "message", "id": f"msg_{suffix}", "status": "completed",
                           "role": "assistant",
                           "content": [_output_text(message.get("content") or "")]})
        for i, call in enumerate(calls):
            function = call.get("function") or {}
            output.append({"type": "function_call", "id": f"fc_{suffix}_{i}",
                           "call_id": call.get("id"), "name": function.get("name"),
                           "arguments": function.get("arguments") or "",
                           "status": "completed"})
        finish = choice.get("finish_reason")
        status = "incomplete" if finish in INCOMPLETE else "completed"
        return self._response(status, output, completion.get("usage"), finish,
                              metrics=completion.get("metrics"))

    # ---- the stream -----------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _start(self, source: dict[str, Any]) -> list[dict[str, Any]]:
        self._identify(source)
        self.started = True
        snapshot = self._response("in_progress", [])
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def _open_item(self, kind: str, **extra: Any) -> list[dict[str, Any]]:
        events = self._close_open()
        suffix = self.response_id.removeprefix("resp_")
        prefix = {"message": "msg", "function_call": "fc", "reasoning": "rs"}[kind]
        item = _Item(kind, f"{prefix}_{suffix}_{len(self.items)}", len(self.items), **extra)
        self.items.append(item)
        self.open = item
        events.append(self._event("response.output_item.added", output_index=item.index,
                                  item=item.to_dict(done=False)))
        if kind == "message":
            events.append(self._event("response.content_part.added", item_id=item.id,
                                      output_index=item.index, content_index=0,
                                      part=_output_text("")))
        return events

    def _close_open(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        text = "".join(item.text)
        where = {"item_id": item.id, "output_index": item.index}
        events = []
        if item.kind == "message":
            events += [self._event("response.output_text.done", **where, content_index=0,
                                   text=text, logprobs=[]),
                       self._event("response.content_part.done", **where, content_index=0,
                                   part=_output_text(text))]
        elif item.kind == "function_call":
            events.append(self._event("response.function_call_arguments.done", **where,
                                      name=item.name, arguments=text))
        else:
            events.append(self._event("response.reasoning_text.done", **where,
                                      content_index=0, text=text))
        events.append(self._event("response.output_item.done", output_index=item.index,
                                  item=item.to_dict(done=True)))
        return events

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = [] if self.open is not None and self.open.kind == kind else \
            self._open_item(kind)
        item = self.open
        assert item is not None
        item.text.append(text)
        name = "response.output_text.delta" if kind == "message" else \
            "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        events.append(self._event(name, item_id=item.id, output_index=item.index,
                                  content_index=0, delta=text, **extra))
        return events

    def _calls(self, entries: list[Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            function = entry.get("function") if isinstance(entry.get("function"), dict) else {}
            index = entry.get("index", 0)
            if isinstance(entry.get("id"), str):  # a call's first entry: id and name
                events += self._open_item("function_call", call_id=entry["id"],
                                          name=str(function.get("name") or ""))
                self.calls[index] = self.open
            item = self.calls.get(index)
            arguments = function.get("arguments")
            if item is not None and isinstance(arguments, str) and arguments:
                item.text.append(arguments)
                events.append(self._event("response.function_call_arguments.delta",
                                          item_id=item.id, output_index=item.index,
                                          delta=arguments))
        return events

    def _outputs(self) -> list[dict[str, Any]]:
        return [item.to_dict(done=True) for item in self.items]

    def on_event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if event.get("object") == "error":
            return self._fail(event)
        if event.get("object") != "chat.completion.chunk":
            return []
        events = [] if self.started else self._start(event)
        choice = (event.get("choices") or [{}])[0]
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        if delta.get("reasoning_content"):
            events += self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            events += self._text("message", delta["content"])
        if delta.get("tool_calls"):
            events += self._calls(delta["tool_calls"])
        finish = choice.get("finish_reason")
        if finish == "error":
            self.failed = event
        elif finish is not None:
            events += self._close_open()
            if not any(item.kind != "reasoning" for item in self.items):  # always a message
                events += self._open_item("message") + self._close_open()
            status = "incomplete" if finish in INCOMPLETE else "completed"
            response = self._response(status, self._outputs(), event.get("usage"), finish,
                                      metrics=event.get("metrics"))
            events.append(self._event(f"response.{status}", response=response))
        return events

    def _fail(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat stream's error event -> `response.failed` (the stream then ends)."""
        events = [] if self.started else self._start(error)
        source = self.failed or {}
        failure = {"code": "server_error" if (error.get("code") or 500) >= 500
                   else "invalid_request", "message": str(error.get("message") or "failed")}
        response = self._response("failed", self._outputs(), source.get("usage"),
                                  error=failure, metrics=source.get("metrics"))
        events.append(self._event("response.failed", response=response))
        return events


def parse_responses_request(body: Any) -> ChatCompletionRequest:
    """A `/v1/responses` body -> the validated chat request it means (400s name fields)."""
    return parse_chat_request(responses_to_chat(body))


def responses_adapter(_req: ChatCompletionRequest, body: Any) -> ResponsesAdapter:
    """The adapter of one request, given its original /v1/responses body."""
    return ResponsesAdapter(request=body if isinstance(body, dict) else {})
