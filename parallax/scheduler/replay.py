"""Replay on failure: one client request across the attempts the scheduler makes for it.

Pure bookkeeping, no sockets (the forwarder drives it, parallax/scheduler/forward.py). The head
of every attempt streams chunks carrying the token ids their text came from (the internal leg,
parallax/serving/internal_leg.py); `ReplaySession` collects those ids, rewrites every chunk into
the client's one stream (its id, its `created`, one role chunk, the internal fields stripped)
and remembers why an attempt failed. When the pipeline breaks, the next attempt asks a head of a
complete pipeline to prefill prompt + the ids collected so far and go on after them; its text
state is primed with those ids, so the client sees one uninterrupted stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from parallax.protocol.common import ENGINE_ERROR, FAILURE_KINDS, INVALID_REQUEST, PEER_LOST
from parallax.serving.errors import error_body
from parallax.serving.internal_leg import KEY, request_fields
from parallax.serving.openai_schemas import chunk, completion

KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, the connection stays open
MAX_LINE = 1 << 20  # a longer SSE line from a head is dropped


@dataclass(frozen=True)
class Failure:
    """Why one attempt ended without a final chunk."""

    kind: str  # protocol.FAILURE_KINDS
    message: str
    status: int = 503
    peer: str | None = None  # activation endpoint the head names as lost
    head_lost: bool = False  # the head's own connection broke (or it ended early)


def should_replay(failure: Failure, failovers: int, max_replays: int) -> bool:
    """Replay what a lost node broke, never what the request broke; at most `max_replays`."""
    return failure.kind != INVALID_REQUEST and failovers < max_replays


def failure_of(event: dict[str, Any]) -> Failure:
    """The failure an error event (`{"object": "error", ...}`) describes."""
    internal = event.get(KEY) if isinstance(event.get(KEY), dict) else {}
    kind = internal.get("kind")
    peer = internal.get("peer")
    code = event.get("code")
    return Failure(kind if kind in FAILURE_KINDS else ENGINE_ERROR,
                   str(event.get("message") or "the request failed"),
                   code if isinstance(code, int) and 400 <= code <= 599 else 503,
                   peer if isinstance(peer, str) else None)


class SSELines:
    """Bytes of an SSE stream in, decoded `data:` payloads out (comments and blanks skipped)."""

    def __init__(self) -> None:
        self._partial = b""
        self._skip = False  # inside an over-long line: drop it

    def feed(self, data: bytes) -> list[bytes]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            skip, self._skip = self._skip, False
            if not skip and line.startswith(b"data:"):
                out.append(line[5:].strip())
        if len(self._partial) > MAX_LINE:
            self._partial, self._skip = b"", True
        return out


def _valid_ids(value: Any) -> list[int]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


@dataclass
class ReplaySession:
    """One client request: ids generated so far, failovers, what the client has been sent.

    Feed every decoded event of the current attempt to `on_event`; it returns the chunks to
    send to the client. `clock` gives seconds (tests pass their own).
    """

    client_id: str
    payload: dict[str, Any]  # the client's request, as the scheduler forwards it
    clock: Callable[[], float] = time.perf_counter
    collect: bool = False  # keep the text for a non-streaming answer
    path: str = "/v1/chat/completions"  # the heads' endpoint (each attempt's)
    generated_ids: list[int] = field(default_factory=list)
    failovers: int = 0
    replay_ms: float = 0.0
    created: int | None = None
    model: str = ""
    sent_role: bool = False
    final: dict[str, Any] | None = None  # the final chunk, once it came (rewritten)
    failure: Failure | None = None
    error_final: dict[str, Any] | None = None  # a final chunk with finish_reason "error"
    done: bool = False  # [DONE] of the current attempt
    reasoning: bool = False  # the request has a reasoning parser (non-streaming shape)
    content_parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # by index (collect)
    logprob_entries: list[Any] = field(default_factory=list)  # `logprobs.content` (collect)
    usage: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.first_token_at: float | None = None
        self.failed_at: float | None = None
        self._num_resumed = 0

    # ---- attempts -----------------------------------------------------------------------

    def attempt_rid(self) -> str:
        """The id the nodes see for the current attempt (fresh per attempt)."""
        return self.client_id if self.failovers == 0 else f"{self.client_id}-r{self.failovers}"

    def attempt_payload(self) -> dict[str, Any]:
        """The body for the current attempt: always a stream, with the ids to resume from."""
        return {**self.payload, "stream": True, **request_fields(self.generated_ids)}

    def begin_replay(self) -> None:
        """The current attempt failed and another one starts."""
        self.failovers += 1
        self.failed_at = self.clock()
        self._num_resumed = len(self.generated_ids)
        self.failure, self.error_final, self.done = None, None, False

    def end_attempt(self, broke: Failure | None = None) -> Failure | None:
        """The current attempt's stream ended (`broke`: how, when it did not end cleanly).
        Returns its failure, or None when the request is complete."""
        if self.final is not None:
            return None
        if self.failure is None:
            self.failure = broke or Failure(
                PEER_LOST, "the pipeline's head node ended the stream early (node lost?)",
                head_lost=True)
        return self.failure

    # ---- events -------------------------------------------------------------------------

    def on_event(self, event: Any) -> list[dict[str, Any]]:
        """One decoded `data:` payload of the current attempt -> chunks for the client."""
        if event == "[DONE]":
            self.done = True
            return []
        if not isinstance(event, dict):
            return []
        if event.get("object") == "error":
            self.failure = failure_of(event)
            return []
        internal = event.pop(KEY, None)
        internal = internal if isinstance(internal, dict) else {}
        self.generated_ids.extend(_valid_ids(internal.get("token_ids")))
        if internal.get("reasoning"):
            self.reasoning = True
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []
        choice = choices[0]
        if self.created is None and isinstance(event.get("created"), int):
            self.created = event["created"]
        event["id"] = self.client_id
        event["created"] = self.created if self.created is not None else event.get("created")
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        finish = choice.get("finish_reason")
        if finish == "error":
            self.error_final = event
            return []
        if self.collect and isinstance(choice.get("logprobs"), dict) and \
                isinstance(choice["logprobs"].get("content"), list):
            self.logprob_entries.extend(choice["logprobs"]["content"])
        if "role" in delta:
            if self.sent_role:
                return []
            self.sent_role = True
            return [event]
        out = []
        text = {k: delta[k] for k in ("content", "reasoning_content", "tool_calls")
                if delta.get(k)}
        if text:
            self._mark_text(text)
            if finish is None:
                return [event]
            out.append(self._copy(event, text, None, with_metrics=False))
        if finish is None:
            return []  # an empty delta (nothing to show)
        final = self._copy(event, {}, finish, with_metrics=True)
        if text and "logprobs" in final["choices"][0]:  # they went with the text copy
            final["choices"][0]["logprobs"] = None
        final["metrics"] = self._metrics(event.get("metrics"))
        self.final = final
        out.append(final)
        return out

    def _mark_text(self, text: dict[str, str]) -> None:
        now = self.clock()
        if self.first_token_at is None:
            self.first_token_at = now
        if self.failed_at is not None:  # the first text after a failover: the seam closed
            self.replay_ms += (now - self.failed_at) * 1000.0
            self.failed_at = None
        if self.collect:
            self.content_parts.append(text.get("content", ""))
            self.reasoning_parts.append(text.get("reasoning_content", ""))
            if "reasoning_content" in text:
                self.reasoning = True
            self._collect_tool_calls(text.get("tool_calls"))

    def _collect_tool_calls(self, deltas: Any) -> None:
        """Accumulate streamed `delta.tool_calls` entries (header, then argument fragments)
        into whole calls, as the OpenAI client does."""
        if not isinstance(deltas, list):
            return
        for entry in deltas:
            if not isinstance(entry, dict) or not isinstance(entry.get("index"), int):
                continue
            call = self.tool_calls.setdefault(entry["index"], {
                "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            if isinstance(entry.get("id"), str):
                call["id"] = entry["id"]
            function = entry.get("function") if isinstance(entry.get("function"), dict) else {}
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    call["function"][key] += function[key]

    @staticmethod
    def _copy(event: dict[str, Any], delta: dict[str, Any], finish: str | None,
              with_metrics: bool) -> dict[str, Any]:
        out = {k: v for k, v in event.items() if k != "metrics" or with_metrics}
        out["choices"] = [{**event["choices"][0], "delta": delta, "finish_reason": finish}]
        return out

    def _metrics(self, metrics: Any) -> dict[str, Any]:
        """The head's metrics plus failovers; with a failover, times are the client's own."""
        out = dict(metrics) if isinstance(metrics, dict) else {}
        if self.failed_at is not None:  # failed over, then ended without new text
            self.replay_ms += (self.clock() - self.failed_at) * 1000.0
            self.failed_at = None
        if self.failovers:
            now = self.clock()
            tokens = (self.usage or {}).get("completion_tokens") or 0
            first = self.first_token_at
            out["ttft_ms"] = None if first is None else round((first - self.started) * 1000, 2)
            out["duration_ms"] = round((now - self.started) * 1000, 2)
            decode = now - first if first is not None else 0.0
            out["tps"] = round((tokens - 1) / decode, 2) if tokens >= 2 and decode > 0 else 0.0
        out["failovers"] = self.failovers
        out["replay_ms"] = round(self.replay_ms, 2)
        out["replayed_tokens"] = self.replayed_tokens
        return out

    @property
    def replayed_tokens(self) -> int:
        """Generated ids the current attempt was given to prefill (0 without a failover)."""
        return self._num_resumed

    # ---- giving up ----------------------------------------------------------------------

    def give_up(self, failure: Failure) -> list[dict[str, Any]]:
        """The events that end the client's stream with `failure` (before [DONE])."""
        if self.error_final is not None:
            final = dict(self.error_final)
        else:  # the scheduler saw the pipeline break before its head could say so
            final = chunk(self.client_id, self.model or str(self.payload.get("model") or ""),
                          self.created if self.created is not None else int(time.time()), {},
                          "error", self.usage)
        final["metrics"] = self._metrics(final.get("metrics"))
        out = [final, error_body(failure.status, failure.message)]
        return out

    def completion(self) -> dict[str, Any]:
        """The non-streaming answer, once `final` came."""
        assert self.final is not None
        choice = self.final["choices"][0]
        return completion(self.client_id, self.model, self.created or int(time.time()),
                          "".join(self.content_parts),
                          "".join(self.reasoning_parts) if self.reasoning else None,
                          choice.get("finish_reason") or "stop", self.final.get("usage") or {},
                          self.final.get("metrics"),
                          [self.tool_calls[i] for i in sorted(self.tool_calls)] or None,
                          self.logprob_entries if self.payload.get("logprobs") not in
                          (None, False) else None)  # /v1/completions: 0..5
