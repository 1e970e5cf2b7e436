"""Executor -> executor stage links: ZeroMQ `tcp://` multipart messages (PUSH -> PULL).

    head executor           middle stage executor(s)           last stage executor
         |  LinkPrefixQuery -->  ...  --> LinkPrefixQuery             |
         |<------------------------------------------ LinkPrefixAnswer |
         |  LinkActivations (+ raw hidden states) -->  ...  -->        |  (samples)
         |<------------------------------------------------ LinkTokens |
         |  LinkRelease -->  ...  --> LinkRelease                      |
      any sender <-- LinkAck (at once, for a message with a send_id) -- its receiver

Every message: frame 0 is a LinkSeal (msgpack), frame 1 one of the tagged structs below
(msgpack); LinkActivations has a frame 2 with the raw bytes of the hidden states of all its
entries, concatenated in entry order ([sum of num tokens, hidden_size] in `dtype`; built and read
by tensors.py). The seal authenticates frames 1.. (node/link_auth.py). Nothing is pickled.
In P2P mode a link a node cannot reach over tcp travels inside a RelayedMessage (p2p.py).
"""

from __future__ import annotations

from typing import Union

import msgspec

from parallax.engine.sampling_params import SamplingParams
from parallax.protocol.common import TokenOutput


class LinkSeal(msgspec.Struct, frozen=True, array_like=True):
    """HMAC-SHA256 under the pipeline's link key over `session`, `seq` and every later frame.

    `session`: random per sending PipelineLinks; `seq`: increases with every message it sends,
    so a receiver drops a replayed message (not newer than the last one of that session).
    """

    session: bytes
    seq: int
    mac: bytes


class ActivationEntry(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """Hidden states of tokens [start_position, start_position + len(token_ids)) of `rid`.

    A chunk with start_position 0 starts the request on the receiving stage (replacing any stale
    state of the same rid) and carries what that stage needs: sampling params, prompt length,
    the endpoints after it. Every chunk names the head's endpoint (where the last stage sends
    tokens, and where any stage reports a request it cannot continue).
    """

    rid: str
    token_ids: list[int]
    start_position: int
    sampling_params: SamplingParams | None = None
    num_prompt_tokens: int = 0
    downstream: list[str] = []
    head_endpoint: str = ""
    due: bool = False  # the last stage samples a token after this chunk
    trace: list[float] = []  # the request's trace records of the stages before (tracing.py)
    # a first chunk that starts at start_position > 0: the receiving stage reuses the
    # [0, start_position) of the prefix it reserved for the request (LinkPrefixQuery)
    reuses_prefix: bool = False


class LinkActivations(msgspec.Struct, tag="activations", frozen=True):
    entries: list[ActivationEntry]
    dtype: str  # torch dtype name of frame 1, e.g. "float32"
    hidden_size: int
    # > 0: answer with a LinkAck to `sender` (the hop's transfer time, node/tracing.py)
    send_id: int = 0
    sender: str = ""


class LinkTokens(msgspec.Struct, tag="tokens", frozen=True):
    """Last stage -> head: sampled tokens (or per-request errors) of one step."""

    outputs: list[TokenOutput]
    send_id: int = 0  # as in LinkActivations
    sender: str = ""


class LinkRelease(msgspec.Struct, tag="release", frozen=True):
    """Free these requests' KV on every later stage; travels the chain after the activations."""

    rids: list[str]


class LinkAck(msgspec.Struct, tag="ack", frozen=True):
    """Receiver -> sender of a message with a `send_id`, at once: the sender's round trip less
    `held_ms` (the receiver's time between taking the message and acking) is the hop's
    transfer time, with no clock shared between the two (parallax/node/tracing.py)."""

    send_id: int
    held_ms: float


class LinkPrefixQuery(msgspec.Struct, tag="prefix_query", frozen=True):
    """Head -> along the chain, before a request with a cached prefix runs: "how much of
    `token_ids` (full blocks) do you hold?". Each stage drops any stale state of `rid`, pins
    the longest prefix its own cache holds (at most what the stage before it holds) and
    passes the query on with `token_ids` cut to that; the last one (or the first that holds
    nothing) answers the head with LinkPrefixAnswer. Like a first chunk, it carries the
    stages after the receiver and the head's endpoint."""

    rid: str
    token_ids: list[int]
    downstream: list[str] = []
    head_endpoint: str = ""


class LinkPrefixAnswer(msgspec.Struct, tag="prefix_answer", frozen=True):
    """Later stage -> head: every later stage holds (and has pinned) the first
    `num_cached_tokens` of the request's prefix; the head starts the request there."""

    rid: str
    num_cached_tokens: int


LinkMessage = Union[LinkActivations, LinkTokens, LinkRelease,  # noqa: UP007
                    LinkAck, LinkPrefixQuery, LinkPrefixAnswer]
_link_decoder = msgspec.msgpack.Decoder(LinkMessage)
_seal_decoder = msgspec.msgpack.Decoder(LinkSeal)


def decode_link(data: bytes) -> (LinkActivations | LinkTokens | LinkRelease | LinkAck
                                 | LinkPrefixQuery | LinkPrefixAnswer):
    """Decode the header frame (frame 1) of a stage-to-stage message."""
    return _link_decoder.decode(data)


def decode_seal(data: bytes) -> LinkSeal:
    """Decode frame 0 of a stage-to-stage message."""
    return _seal_decoder.decode(data)
