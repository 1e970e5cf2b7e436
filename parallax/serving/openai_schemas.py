"""OpenAI chat-completions request parsing/validation and response builders.

Parsing is hand-written (no pydantic) so that every 400 names the field and says exactly what is
wrong, e.g. ``messages[1].role must be one of system, user, assistant, tool, developer``.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from parallax.engine.sampling_params import SAMPLING_RANGES, SamplingParams
from parallax.serving.errors import APIError
from parallax.serving.structured import ResponseFormat, parse_response_format
from parallax.serving.tool_grammar import check_tool_grammar

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool", "developer")
# Request limits a production server keeps (each 400 names the limit). OpenAI allows 4 stop
# strings; other servers take more, so 16 keeps clients working while bounding the matcher.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # the stop matcher holds back up to this many characters of text
MAX_MESSAGES = 2048  # OpenAI's own limit on 'messages'
MAX_TOP_K = 2**31 - 1  # larger than any vocabulary; keeps the value inside the wire's int range
# The only `chat_template_kwargs` a caller may set: the switches thinking models' templates read
# (Qwen3/GLM `enable_thinking`, DeepSeek-V3.1/Granite `thinking`, gpt-oss `reasoning_effort`).
# Anything else, above all `chat_template` (caller-written Jinja run on the node), is refused.
ALLOWED_TEMPLATE_KWARGS: tuple[str, ...] = ("enable_thinking", "thinking", "reasoning_effort")
MAX_TEMPLATE_KWARG_CHARS = 64
MAX_TOOLS = 128  # OpenAI's limit on 'tools'
TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")  # OpenAI's, plus '.' and ':'
TOOL_CHOICES: tuple[str, ...] = ("auto", "none", "required")
CHAT_ID_PREFIX = "chatcmpl-"  # the `id` of a chat completion and of its chunks
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


@dataclass
class ChatMessage:
    """One chat message. `content` is plain text (text parts are joined with newlines)."""

    role: str
    content: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_template_dict(self) -> dict[str, Any]:
        """The message as a chat template expects it: role, content, and any extra keys."""
        out: dict[str, Any] = dict(self.extra)
        out["role"] = self.role
        out["content"] = self.content if self.content is not None else ""
        if out.get("tool_calls"):  # templates index the arguments: an object, as HF documents
            out["tool_calls"] = [_template_call(c) for c in out["tool_calls"]]
        return out

    def to_body(self) -> dict[str, Any]:
        """The message as the API takes it (text parts already joined)."""
        return {"role": self.role, "content": self.content, **self.extra}


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, dict):
            function["arguments"] = decoded
    return {**call, "function": function}


@dataclass
class ChatCompletionRequest:
    """A validated `POST /v1/chat/completions` body. `None` means "not given"."""

    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    include_usage: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    rid: str | None = None
    routing_table: list[Any] | None = None
    ignore_eos: bool = False
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "auto"  # auto | none | required | function (named: tool_choice_name)
    tool_choice_name: str | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int = 0
    priority: int = 0
    response_format: ResponseFormat = field(default_factory=ResponseFormat)

    @property
    def forces_tool_call(self) -> bool:
        """`tool_choice` is "required" or a named function: the answer is decoded as calls."""
        return self.uses_tools and self.tool_choice in ("required", "function")

    @property
    def uses_tools(self) -> bool:
        """Tools go to the template and the answer is parsed for calls."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools the template sees: all of them, or the one a named choice forces."""
        if not self.uses_tools:
            return []
        if self.tool_choice == "function":
            return [t for t in self.tools if t["function"]["name"] == self.tool_choice_name]
        return list(self.tools)

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as dicts for `tokenizer.apply_chat_template`."""
        return [m.to_template_dict() for m in self.messages]

    def to_body(self) -> dict[str, Any]:
        """The validated request as a normalized body: what the scheduler forwards to a head
        node, which parses it again (it trusts no sender). `parse_chat_request` of it gives this
        request back, less `model`, `rid` and `routing_table` (the scheduler's to set)."""
        body: dict[str, Any] = {"messages": [m.to_body() for m in self.messages],
                                **self._generation_body()}
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = dict(self.chat_template_kwargs)
        if self.tools:
            body["tools"] = self.tools
        body["tool_choice"] = self.tool_choice if self.tool_choice != "function" else {
            "type": "function", "function": {"name": self.tool_choice_name}}
        body["parallel_tool_calls"] = self.parallel_tool_calls
        if self.logprobs:
            body["logprobs"] = True
        if self.top_logprobs:
            body["top_logprobs"] = self.top_logprobs
        return body

    def _generation_body(self) -> dict[str, Any]:
        """The fields chat and text completions share, as a body holds them."""
        optional = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                    "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                    "seed": self.seed, "presence_penalty": self.presence_penalty,
                    "frequency_penalty": self.frequency_penalty}
        body: dict[str, Any] = {"stream": self.stream,
                                **{k: v for k, v in optional.items() if v is not None}}
        if self.stop:
            body["stop"] = list(self.stop)
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.priority:
            body["priority"] = self.priority
        response_format = self.response_format.to_body()
        if response_format is not None:
            body["response_format"] = response_format
        return body


# ---------------------------------------------------------------- field checks


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _bad(message: str) -> APIError:
    return APIError(400, message)


def _opt_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be a boolean, got {_type_name(value)}")
    return value


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {_type_name(value)} {value!r}")
    return value


def _opt_float(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{name}' must be a number, got {_type_name(value)} {value!r}")
    if not math.isfinite(value):
        raise _bad(f"'{name}' must be a finite number, got {value!r}")
    return float(value)


def _check_range(name: str, value: float | None, rule: str | None = None) -> float | None:
    """`value` (None: not given) unless it lies outside SAMPLING_RANGES[rule or name]: 400."""
    allowed = SAMPLING_RANGES[rule or name]
    if value is not None and value not in allowed:
        raise _bad(f"'{name}' must be {allowed}, got {value}")
    return value


def _parse_content(value: Any, where: str, role: str) -> str | None:
    if isinstance(value, str):
        return value
    if value is None:
        if role == "assistant":
            return None
        raise _bad(f"'{where}' must be a string or an array of text parts, got null")
    if isinstance(value, list):
        texts: list[str] = []
        for j, part in enumerate(value):
            pwhere = f"{where}[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"'{pwhere}' must be an object, got {_type_name(part)}")
            ptype = part.get("type")
            if ptype != "text":
                raise _bad(
                    f"'{pwhere}.type' must be 'text' (only text content is supported), got {ptype!r}"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"'{pwhere}.text' must be a string, got {_type_name(text)}")
            texts.append(text)
        return "\n".join(texts)
    raise _bad(f"'{where}' must be a string or an array of text parts, got {_type_name(value)}")


def _parse_messages(value: Any) -> list[ChatMessage]:
    if value is None:
        raise _bad("'messages' is required")
    if not isinstance(value, list):
        raise _bad(f"'messages' must be an array, got {_type_name(value)}")
    if not value:
        raise _bad("'messages' must contain at least one message")
    if len(value) > MAX_MESSAGES:
        raise _bad(f"'messages' may hold at most {MAX_MESSAGES} messages, got {len(value)}")
    messages: list[ChatMessage] = []
    for i, raw in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise _bad(f"'{where}' must be an object, got {_type_name(raw)}")
        role = raw.get("role")
        if role is None:
            raise _bad(f"'{where}.role' is required")
        if role not in ROLES:
            raise _bad(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}")
        if "content" not in raw and role != "assistant":
            raise _bad(f"'{where}.content' is required")
        content = _parse_content(raw.get("content"), f"{where}.content", role)
        extra = {k: v for k, v in raw.items() if k not in ("role", "content")}
        if raw.get("tool_calls") is not None:
            if role != "assistant":
                raise _bad(f"'{where}.tool_calls' is only allowed in assistant messages")
            _check_message_calls(raw["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            call_id = raw.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"'{where}.tool_call_id' is required in tool messages and must be a "
                           f"non-empty string, got {_type_name(call_id)}")
        messages.append(ChatMessage(role=role, content=content, extra=extra))
    return messages


def _check_message_calls(value: Any, where: str) -> None:
    """An assistant message's `tool_calls`: [{id, type: "function", function: {name,
    arguments: string}}]."""
    if not isinstance(value, list):
        raise _bad(f"'{where}' must be an array, got {_type_name(value)}")
    for j, call in enumerate(value):
        cwhere = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise _bad(f"'{cwhere}' must be an object, got {_type_name(call)}")
        if call.get("type", "function") != "function":
            raise _bad(f"'{cwhere}.type' must be 'function', got {call.get('type')!r}")
        if call.get("id") is not None and not isinstance(call.get("id"), str):
            raise _bad(f"'{cwhere}.id' must be a string, got {_type_name(call.get('id'))}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _bad(f"'{cwhere}.function' must be an object, got {_type_name(function)}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise _bad(f"'{cwhere}.function.name' must be a non-empty string, got "
                       f"{_type_name(function.get('name'))}")
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, (str, dict)):
            raise _bad(f"'{cwhere}.function.arguments' must be a JSON string, got "
                       f"{_type_name(arguments)}")


def _parse_tools(value: Any) -> list[dict[str, Any]]:
    """`tools`: [{"type": "function", "function": {name, description?, parameters?, strict?}}]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(f"'tools' must be an array, got {_type_name(value)}")
    if len(value) > MAX_TOOLS:
        raise _bad(f"'tools' may hold at most {MAX_TOOLS} tools, got {len(value)}")
    tools: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"'{where}' must be an object, got {_type_name(tool)}")
        if tool.get("type") != "function":
            raise _bad(f"'{where}.type' must be 'function' (the only tool type supported), "
                       f"got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _bad(f"'{where}.function' must be an object, got {_type_name(function)}")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
            raise _bad(f"'{where}.function.name' must be 1-64 letters, digits, '_', '-', '.' "
                       f"or ':', got {name!r}")
        if name in names:
            raise _bad(f"'{where}.function.name' {name!r} is used by two tools")
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad(f"'{where}.function.description' must be a string, got "
                       f"{_type_name(description)}")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(f"'{where}.function.parameters' must be a JSON schema object, got "
                       f"{_type_name(parameters)}")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad(f"'{where}.function.strict' must be a boolean, got {_type_name(strict)}")
        clean: dict[str, Any] = {"name": name}
        if description is not None:
            clean["description"] = description
        clean["parameters"] = parameters if parameters is not None else {
            "type": "object", "properties": {}}
        tools.append({"type": "function", "function": clean})
    return tools


def _parse_tool_choice(value: Any, tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    """`tool_choice` → (auto | none | required | function, the named function)."""
    if value is None:
        return ("auto" if tools else "none"), None
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise _bad(f"'tool_choice' must be one of {', '.join(TOOL_CHOICES)} or "
                       f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, "
                       f"got {value!r}")
        if value == "required" and not tools:
            raise _bad("'tool_choice' is 'required' but no 'tools' were given")
        return value, None
    if not isinstance(value, dict):
        raise _bad(f"'tool_choice' must be a string or an object, got {_type_name(value)}")
    if value.get("type") != "function":
        raise _bad(f"'tool_choice.type' must be 'function', got {value.get('type')!r}")
    function = value.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise _bad("'tool_choice.function.name' must be a string")
    if name not in {t["function"]["name"] for t in tools}:
        raise _bad(f"'tool_choice.function.name' is {name!r}, which is not one of 'tools'")
    return "function", name


def _parse_stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise _bad(f"'stop' must be a string or an array of strings, got {_type_name(value)}")
    if len(value) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise _bad(f"'stop[{i}]' must be a string, got {_type_name(s)}")
        if not s:
            raise _bad(f"'stop[{i}]' must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise _bad(f"'stop[{i}]' may be at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return list(value)


def _parse_template_kwargs(value: Any) -> dict[str, Any]:
    """`chat_template_kwargs`: only allow-listed keys, with JSON scalar values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"'chat_template_kwargs' must be an object, got {_type_name(value)}")
    allowed = ", ".join(ALLOWED_TEMPLATE_KWARGS)
    for key, item in value.items():
        if key not in ALLOWED_TEMPLATE_KWARGS:
            raise _bad(f"'chat_template_kwargs.{key}' is not accepted; the allowed keys are "
                       f"{allowed} (the chat template itself is the operator's)")
        if item is not None and not isinstance(item, (bool, int, float, str)):
            raise _bad(f"'chat_template_kwargs.{key}' must be a string, number, boolean or "
                       f"null, got {_type_name(item)}")
        if isinstance(item, str) and len(item) > MAX_TEMPLATE_KWARG_CHARS:
            raise _bad(f"'chat_template_kwargs.{key}' may be at most "
                       f"{MAX_TEMPLATE_KWARG_CHARS} characters, got {len(item)}")
    return dict(value)


# fields that would change the answer and are not supported yet: a 400 names them rather than
# silently answering as if they were absent (each value here is what "absent" means)
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "functions": (None, []),
    "function_call": (None, "none"), "web_search_options": (None,),
}
# accepted and without effect on the answer (as OpenAI's own API treats them for us)
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier",
                  "prompt_cache_key", "stream_options")


def _reject_unsupported(body: dict[str, Any]) -> None:
    for name, absent in UNSUPPORTED_FIELDS.items():
        if name in body and not any(body[name] == value and type(body[name]) is type(value)
                                    for value in absent):
            raise _bad(f"'{name}' is not supported by this server (yet); remove it from the "
                       "request")


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raise `APIError(400, ...)` naming the offending field.

    Fields in UNSUPPORTED_FIELDS with a value that would change the answer are a 400; other
    unknown top-level fields are ignored (clients send `user`, `metadata`, ...).
    """
    if not isinstance(body, dict):
        raise _bad(f"request body must be a JSON object, got {_type_name(body)}")
    _reject_unsupported(body)
    messages = _parse_messages(body.get("messages"))
    stream = _opt_bool(body, "stream")

    max_tokens = _opt_int(body, "max_tokens")
    max_completion_tokens = _opt_int(body, "max_completion_tokens")
    for name, value in (
        ("max_tokens", max_tokens),
        ("max_completion_tokens", max_completion_tokens),
    ):
        _check_range(name, value, "max_tokens")
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens

    temperature = _check_range("temperature", _opt_float(body, "temperature"))
    top_p = _check_range("top_p", _opt_float(body, "top_p"))
    top_k = _opt_int(body, "top_k")
    if top_k is not None and not -1 <= top_k <= MAX_TOP_K:
        raise _bad(f"'top_k' must be -1 (disabled), 0 (disabled) or in [1, {MAX_TOP_K}], "
                   f"got {top_k}")
    min_p = _check_range("min_p", _opt_float(body, "min_p"))
    penalties = {name: _check_range(name, _opt_float(body, name))
                 for name in ("presence_penalty", "frequency_penalty")}
    seed = _opt_int(body, "seed")
    if seed is not None and not _SEED_MIN <= seed <= _SEED_MAX:
        raise _bad(f"'seed' must fit in 64 bits, got {seed}")
    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise _bad(f"'n' must be 1 (only one choice per request is supported), got {n}")

    logprobs = _opt_bool(body, "logprobs")
    priority = _opt_int(body, "priority")
    if priority is not None and priority not in SAMPLING_RANGES["priority"]:
        raise _bad(f"'priority' must be an integer {SAMPLING_RANGES['priority']} (lower runs "
                   f"first), got {priority}")
    top_logprobs = _check_range("top_logprobs", _opt_int(body, "top_logprobs"))
    if top_logprobs and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs' to be true")

    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _bad(f"'stream_options' must be an object, got {_type_name(stream_options)}")
        value = stream_options.get("include_usage")
        if value is not None and not isinstance(value, bool):
            raise _bad(f"'stream_options.include_usage' must be a boolean, got {_type_name(value)}")
        include_usage = bool(value)

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {_type_name(model)}")
    rid = body.get("rid")
    if rid is not None and (not isinstance(rid, str) or not rid):
        raise _bad(f"'rid' must be a non-empty string, got {_type_name(rid)} {rid!r}")
    routing_table = body.get("routing_table")
    if routing_table is not None and not isinstance(routing_table, list):
        raise _bad(f"'routing_table' must be an array, got {_type_name(routing_table)}")

    tools = _parse_tools(body.get("tools"))
    tool_choice, tool_choice_name = _parse_tool_choice(body.get("tool_choice"), tools)
    parallel_tool_calls = _opt_bool(body, "parallel_tool_calls", default=True)
    response_format = parse_response_format(body.get("response_format"))
    if tool_choice in ("required", "function"):
        if response_format.grammar is not None:
            raise _bad("'response_format' and a forced 'tool_choice' exclude each other: the "
                       "answer is either the JSON or the calls")
    if tools and tool_choice != "none":  # calls, forced or not, are decoded under a grammar
        check_tool_grammar([t for t in tools if tool_choice != "function"
                            or t["function"]["name"] == tool_choice_name], parallel_tool_calls)

    return ChatCompletionRequest(
        messages=messages,
        stream=stream,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        stop=_parse_stop(body.get("stop")),
        seed=seed,
        presence_penalty=penalties["presence_penalty"],
        frequency_penalty=penalties["frequency_penalty"],
        include_usage=include_usage,
        chat_template_kwargs=_parse_template_kwargs(body.get("chat_template_kwargs")),
        model=model,
        rid=rid,
        routing_table=routing_table,
        ignore_eos=_opt_bool(body, "ignore_eos"),
        tools=tools,
        tool_choice=tool_choice,
        tool_choice_name=tool_choice_name,
        parallel_tool_calls=parallel_tool_calls,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        priority=priority or 0,
        response_format=response_format,
    )


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body; malformed or empty JSON → `APIError(400)`."""
    if not raw or not raw.strip():
        raise _bad("request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None


def new_chat_id() -> str:
    """A fresh request id: `chatcmpl-` and 24 hex digits."""
    return f"{CHAT_ID_PREFIX}{uuid.uuid4().hex[:24]}"


def check_model_name(requested: str | None, served: str) -> str:
    """Return the served model's name if `requested` names it (or is empty/"default"); else 404.

    A repo id's last path part is accepted too (`Qwen3-0.6B` for `Qwen/Qwen3-0.6B`).
    """
    if requested in (None, "", "default") or requested == served:
        return served
    if requested.rsplit("/", 1)[-1] == served.rsplit("/", 1)[-1]:
        return served
    raise APIError(404, f"model {requested!r} is not served here; this server serves {served!r}")


def to_sampling_params(
    req: ChatCompletionRequest,
    default_max_tokens: int,
    eos_token_ids: Iterable[int] = (),
    grammar: str | None = None,
) -> SamplingParams:
    """Build engine sampling params from a request (OpenAI defaults: temperature 1, top_p 1);
    `grammar` (parallax/serving/structured.py) constrains the answer."""
    stop_ids = tuple(dict.fromkeys(int(t) for t in eos_token_ids))
    top_k = req.top_k if req.top_k is not None else 0
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if top_k < 0 else top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        max_tokens=req.max_tokens if req.max_tokens is not None else default_max_tokens,
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs,
        priority=req.priority,
        grammar=grammar,
    )
    try:
        params.validate()
    except ValueError as exc:
        raise _bad(str(exc)) from None
    return params


# ---------------------------------------------------------------- response builders


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """`{"prompt_tokens", "completion_tokens", "total_tokens"}`."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    usage: dict[str, int] | None,
    metrics: dict[str, Any] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk` event; `metrics` is added (final chunk) when given;
    `logprobs`: the entries of the tokens this chunk's text came from (`logprobs_entry`)."""
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": _logprobs(logprobs),
                     "finish_reason": finish_reason}],
        "usage": usage,
    }
    if metrics is not None:
        out["metrics"] = metrics
    return out


def completion(
    rid: str,
    model: str,
    created: int,
    content: str,
    reasoning_content: str | None,
    finish_reason: str,
    usage: dict[str, int],
    metrics: dict[str, Any] | None,
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A non-streaming `chat.completion` response; with `tool_calls`, empty content is null;
    `logprobs`: one entry per generated token (None: not requested)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
        if not content:
            message["content"] = None
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": _logprobs(logprobs),
                     "finish_reason": finish_reason}],
        "usage": usage,
    }
    if metrics is not None:
        out["metrics"] = metrics
    return out


def _logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries}


def _token_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def logprobs_entry(decode, token_id: int, logprob: float,
                   top: Iterable[tuple[int, float]]) -> dict[str, Any]:
    """One token's entry of `choices[0].logprobs.content`, as OpenAI shapes it; `decode(id)`
    is the text of that one token id."""
    entry = _token_logprob(decode(token_id), logprob)
    entry["top_logprobs"] = [_token_logprob(decode(i), lp) for i, lp in top]
    return entry


def models_list(model_name: str, created: int | None = None) -> dict[str, Any]:
    """The `GET /v1/models` body listing the one served model."""
    return {
        "object": "list",
        "data": [
            {
                "id": model_name,
                "object": "model",
                "created": int(time.time()) if created is None else created,
                "owned_by": "parallax",
            }
        ],
    }
