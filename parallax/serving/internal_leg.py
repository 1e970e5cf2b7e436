"""The internal leg between the scheduler and a head node: what rides on top of the OpenAI API.

The scheduler relays every stream; to continue one on another pipeline when its pipeline breaks
it must know the generated token ids and why a request failed. Everything internal lives under
one key, `"parallax"`, which the scheduler strips before the client sees anything:

- request (scheduler -> head), JSON body: `"parallax": {"internal": true}` asks for the fields
  below; `"resume_token_ids": [...]` (ids the request already generated on a pipeline that
  broke) makes the head prefill prompt + those ids and continue after them, its text state
  primed with them (parallax/serving/text_state.py).
- every chunk (head -> scheduler): `"parallax": {"token_ids": [...]}`, the ids fed since the
  previous chunk; their text is in this chunk (or was held back: a stop-string candidate, half a
  UTF-8 character). On this leg the final chunk carries the last text delta itself, so no text
  goes out before the request has really ended, and says `"reasoning": true` when the request
  has a reasoning parser (the non-streaming answer then has `reasoning_content`).
- the error event: `"parallax": {"kind": "peer_lost" | "stage_timeout" | "invalid_request" |
  "engine_error", "peer": "tcp://..."}` (protocol.FAILURE_KINDS; `peer`: the lost endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parallax.serving.errors import APIError

KEY = "parallax"


@dataclass(frozen=True)
class InternalRequest:
    """The internal part of a chat request a head node received."""

    internal: bool = False  # add token ids and failure kinds to what is sent back
    resume_token_ids: list[int] = field(default_factory=list)


def parse_internal(body: Any, vocab_size: int, max_ids: int) -> InternalRequest:
    """Validate `body["parallax"]` (absent: a plain OpenAI request); 400 when malformed."""
    raw = body.get(KEY) if isinstance(body, dict) else None
    if raw is None:
        return InternalRequest()
    if not isinstance(raw, dict):
        raise APIError(400, f"'{KEY}' must be an object")
    internal = raw.get("internal", False)
    if not isinstance(internal, bool):
        raise APIError(400, f"'{KEY}.internal' must be a boolean")
    ids = raw.get("resume_token_ids", [])
    if not isinstance(ids, list) or len(ids) > max_ids:
        raise APIError(400, f"'{KEY}.resume_token_ids' must be an array of at most {max_ids} "
                            "token ids")
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) \
                or not 0 <= token_id < vocab_size:
            raise APIError(400, f"'{KEY}.resume_token_ids' holds {token_id!r}, not a token id "
                                f"of this model (0..{vocab_size - 1})")
    return InternalRequest(internal, list(ids))


def request_fields(resume_token_ids: list[int]) -> dict[str, Any]:
    """What the scheduler adds to a request body it sends to a head."""
    fields: dict[str, Any] = {"internal": True}
    if resume_token_ids:
        fields["resume_token_ids"] = list(resume_token_ids)
    return {KEY: fields}
