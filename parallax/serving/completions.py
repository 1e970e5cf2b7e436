"""`POST /v1/completions`, the legacy text-completion API, on top of the chat path.

The prompt (a string, a list of one string, or token ids) is tokenized as is, without a chat
template (the tokenizer adds its BOS as it would for any text); everything else is a chat request:
the sampling fields are validated by `parse_chat_request`, generation, stop strings, the
scheduler's placement and replay are the chat path's. `CompletionAdapter` turns its output into
`text_completion` objects. Legacy `logprobs` (an integer 0..5: the sampled token plus that many
alternatives) come back as `{tokens, token_logprobs, top_logprobs, text_offset}`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from parallax.serving.adapters import plain_encode
from parallax.serving.errors import APIError
from parallax.serving.openai_schemas import ChatCompletionRequest, parse_chat_request

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this API
MAX_LEGACY_LOGPROBS = 5  # OpenAI's limit on the legacy `logprobs`
MAX_PROMPT_IDS = 1 << 20  # a bound on a token-id prompt before the model's context checks it
# chat-only fields: the legacy API has no messages, tools or chat template
CHAT_ONLY_FIELDS = ("messages", "tools", "tool_choice", "parallel_tool_calls",
                    "chat_template_kwargs", "top_logprobs", "max_completion_tokens")


@dataclass
class TextCompletionRequest(ChatCompletionRequest):
    """A validated `/v1/completions` body: a chat request without messages, plus its prompt."""

    prompt: str | list[int] = ""
    echo: bool = False
    legacy_logprobs: int | None = None  # None: not requested

    def prompt_text(self) -> str | None:
        """The prompt as text (None for a token-id prompt)."""
        return self.prompt if isinstance(self.prompt, str) else None

    def to_body(self) -> dict[str, Any]:
        """The validated request as a normalized `/v1/completions` body (see
        `ChatCompletionRequest.to_body`): `parse_completion_request` of it gives it back."""
        body: dict[str, Any] = {"prompt": self.prompt, **self._generation_body()}
        if self.echo:
            body["echo"] = True
        if self.legacy_logprobs is not None:
            body["logprobs"] = self.legacy_logprobs
        return body


def _bad(message: str) -> APIError:
    return APIError(400, message)


def _parse_prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(value) > MAX_PROMPT_IDS:
            raise _bad(f"'prompt' may hold at most {MAX_PROMPT_IDS} token ids")
        if min(value) < 0:
            raise _bad("'prompt' token ids must be >= 0")
        return list(value)
    if value is None:
        raise _bad("'prompt' is required")
    if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        raise _bad("'prompt' holds several prompts; send one prompt per request (a string, a "
                   "list of one string, or a list of token ids)")
    raise _bad("'prompt' must be a string, a list of one string, or a non-empty list of token "
               "ids")


def _check_unsupported(body: dict[str, Any]) -> None:
    for name in CHAT_ONLY_FIELDS:
        if body.get(name) is not None:
            raise _bad(f"'{name}' belongs to /v1/chat/completions; /v1/completions does not "
                       "take it")
    if body.get("suffix") not in (None, ""):
        raise _bad("'suffix' is not supported by this server (no fill-in-the-middle); remove it")
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and value != 1:
            raise _bad(f"'{name}' must be 1 (only one choice per request is supported), got "
                       f"{value!r}")


def parse_completion_request(body: Any) -> TextCompletionRequest:
    """Validate a `/v1/completions` body; 400 naming the offending field."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    _check_unsupported(body)
    prompt = _parse_prompt(body.get("prompt"))
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise _bad("'echo' must be a boolean")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_LEGACY_LOGPROBS):
        raise _bad(f"'logprobs' must be an integer in [0, {MAX_LEGACY_LOGPROBS}] (the number "
                   f"of alternatives per token) or null, got {logprobs!r}")
    if echo and not isinstance(prompt, str):
        raise _bad("'echo' needs a text prompt (a token-id prompt cannot be echoed)")
    if echo and logprobs is not None:
        raise _bad("'echo' with 'logprobs' asks for the prompt's logprobs, which this server "
                   "does not compute; drop one of them")
    chat_fields = {k: v for k, v in body.items()
                   if k not in ("prompt", "echo", "logprobs", "suffix", "best_of", "n")}
    chat_fields["messages"] = [{"role": "user", "content": ""}]  # validated, then dropped
    if logprobs is not None:
        chat_fields["logprobs"], chat_fields["top_logprobs"] = True, logprobs
    if chat_fields.get("max_tokens") is None:
        chat_fields["max_tokens"] = DEFAULT_MAX_TOKENS
    chat = parse_chat_request(chat_fields)
    values = {f.name: getattr(chat, f.name) for f in dataclasses.fields(chat)}
    values["messages"] = []
    return TextCompletionRequest(**values, prompt=prompt, echo=bool(echo),
                                 legacy_logprobs=logprobs)


def legacy_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Chat `logprobs.content` entries -> the legacy shape; `offset`: where the first token's
    text starts in the choice's text (so far)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                           "text_offset": []}
    for entry in entries:
        token = str(entry.get("token", ""))
        out["tokens"].append(token)
        out["token_logprobs"].append(entry.get("logprob"))
        out["top_logprobs"].append({str(t.get("token", "")): t.get("logprob")
                                    for t in entry.get("top_logprobs") or []})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


@dataclass
class CompletionAdapter:
    """Chat output -> `text_completion` objects (see parallax/serving/adapters.py)."""

    echo_text: str = ""  # the prompt, when `echo`
    logprobs: bool = False
    offset: int = 0  # characters of text sent so far (legacy logprobs' text_offset)
    echoed: bool = False
    pending: list[dict[str, Any]] = field(default_factory=list)

    def encode(self, event: dict[str, Any]) -> bytes:
        return plain_encode(event)

    def _choice(self, text: str, finish: str | None, entries: Any) -> dict[str, Any]:
        logprobs = None
        if self.logprobs:
            logprobs = legacy_logprobs(entries if isinstance(entries, list) else [],
                                       self.offset)
        self.offset += len(text)
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _object(self, source: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
        out = {"id": source.get("id"), "object": "text_completion",
               "created": source.get("created"), "model": source.get("model"),
               "choices": [choice], "usage": source.get("usage")}
        if "metrics" in source:
            out["metrics"] = source["metrics"]
        return out

    def on_event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if event.get("object") != "chat.completion.chunk":
            return [event]  # an error event passes as it is
        choices = event.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        finish = choice.get("finish_reason")
        text = ""
        if not self.echoed:  # the echo goes with the first chunk (the role chunk)
            self.echoed, text = True, self.echo_text
        text += (delta.get("reasoning_content") or "") + (delta.get("content") or "")
        entries = (choice.get("logprobs") or {}).get("content")
        if not text and finish is None and not entries:
            return []
        return [self._object(event, self._choice(text, finish, entries))]

    def body(self, completion: dict[str, Any]) -> dict[str, Any]:
        choice = completion["choices"][0]
        message = choice.get("message") or {}
        text = self.echo_text + (message.get("reasoning_content") or "") + \
            (message.get("content") or "")
        self.offset = len(self.echo_text)
        entries = (choice.get("logprobs") or {}).get("content")
        out = self._object(completion, self._choice(text, choice.get("finish_reason"), entries))
        return out


def completion_adapter(req: TextCompletionRequest, _body: Any = None) -> CompletionAdapter:
    """The adapter of one request."""
    return CompletionAdapter(echo_text=req.prompt_text() or "" if req.echo else "",
                             logprobs=req.legacy_logprobs is not None)
