"""What more than one wire carries, and the one msgpack encoder of every msgpack wire.

`TokenOutput` travels executor -> HTTP server (ipc.py, inside StepOutputs) and last stage ->
head (links.py, inside LinkTokens); `DownloadProgress` travels executor -> HTTP server (ipc.py)
and node -> scheduler (control.py, inside Heartbeat). Nothing here is ever pickled.
"""

from __future__ import annotations

import msgspec

_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """msgpack bytes of any message of the msgpack wires (ipc, stage links, P2P)."""
    return _encoder.encode(message)


class DownloadProgress(msgspec.Struct, frozen=True):
    """Bytes of the node's shard fetched from the hub so far (a hub GGUF's tensor ranges)."""

    done_bytes: int
    total_bytes: int
    bytes_per_s: float
    eta_s: float


# Why a request failed (TokenOutput.kind), so that whoever drives it can decide to replay it:
# the pipeline broke (a peer was lost, or took nothing in time: replay elsewhere), the engine
# failed on it (replay, a bounded number of times), or the request itself is invalid (never).
PEER_LOST = "peer_lost"
STAGE_TIMEOUT = "stage_timeout"
INVALID_REQUEST = "invalid_request"
ENGINE_ERROR = "engine_error"
FAILURE_KINDS = (PEER_LOST, STAGE_TIMEOUT, INVALID_REQUEST, ENGINE_ERROR)


class TokenOutput(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """What one request produced in one step: a token, and/or the end of the request.

    `finish_reason` is one of stop | length | abort | error; `error` says what went wrong,
    `kind` (one of FAILURE_KINDS) why, and `peer` the activation endpoint that was lost or
    timed out, when one was. `logprob` and `top_logprobs` ((id, logprob) pairs, most likely
    first) come with the token when the request asked for logprobs (engine/sampler.py).
    """

    rid: str
    token_id: int | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    kind: str | None = None
    peer: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = []
    # the request's trace so far: one STAGE_RECORD_LEN-float record per stage, the head first
    # (parallax/node/tracing.py; every stage measures with its own clock only)
    trace: list[float] = []
