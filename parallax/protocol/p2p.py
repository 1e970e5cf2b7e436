"""P2P mode (Lattica): HTTP over a stream, scheduler records in the DHT, relayed stage links.

    caller (p2p/bridge.py BridgeClient)               peer (p2p/bridge.py HttpBridge)
         |  BridgeRequest (one, msgpack) -------------------->|  -> its local HTTP server
         |<-------- BridgeHead, BridgeBody..., BridgeEnd ------|  (a stream; no BridgeEnd:
                                                                    the stream was cut)

    P2P scheduler (p2p/roles.py) -- SchedulerRecord --> DHT key parallax/scheduler/<peer id>
    stage (p2p/relay.py) -- RelayedMessage (a stage link's frames) --> target peer's relay
                                                     --> its executor's activation endpoint

Lattica pickles by default; these bytes are ours (`common.encode`, the decoders below), so
nothing is unpickled on either side.
"""

from __future__ import annotations

from typing import Union

import msgspec


class BridgeRequest(msgspec.Struct, frozen=True):
    """Caller -> peer: one HTTP request for the peer's local server."""

    method: str
    path: str  # path and query, e.g. /node/heartbeat
    headers: list[tuple[str, str]]
    body: bytes = b""


class BridgeHead(msgspec.Struct, tag="head", frozen=True):
    """Peer -> caller, first frame: the answer's status and headers."""

    status: int
    headers: list[tuple[str, str]]


class BridgeBody(msgspec.Struct, tag="body", frozen=True):
    """Peer -> caller: a chunk of the answer's body."""

    data: bytes


class BridgeEnd(msgspec.Struct, tag="end", frozen=True):
    """Peer -> caller, last frame: the answer is complete (or failed, with `error`)."""

    error: str | None = None  # the local server failed mid-answer


BridgeFrame = Union[BridgeHead, BridgeBody, BridgeEnd]  # noqa: UP007
_bridge_request_decoder = msgspec.msgpack.Decoder(BridgeRequest)
_bridge_frame_decoder = msgspec.msgpack.Decoder(BridgeFrame)


def decode_bridge_request(data: bytes) -> BridgeRequest:
    """Decode what a caller sent (raises msgspec.DecodeError / ValidationError)."""
    return _bridge_request_decoder.decode(data)


def decode_bridge_frame(data: bytes) -> BridgeHead | BridgeBody | BridgeEnd:
    """Decode one frame of a peer's answer (raises msgspec.DecodeError / ValidationError)."""
    return _bridge_frame_decoder.decode(data)


class SchedulerRecord(msgspec.Struct, frozen=True):
    """What a P2P scheduler publishes in the DHT under `parallax/scheduler/<peer id>`."""

    peer_id: str
    addresses: list[str]  # multiaddrs it listens on
    model: str | None = None


class RelayedMessage(msgspec.Struct, frozen=True):
    """A stage message carried over Lattica (ActivationRelay in parallax/p2p/relay.py): the
    ZeroMQ frames as they were sent, for the executor of `target_peer_id`."""

    target_peer_id: str
    frames: list[bytes]


_relayed_decoder = msgspec.msgpack.Decoder(RelayedMessage)
_scheduler_record_decoder = msgspec.msgpack.Decoder(SchedulerRecord)


def decode_relayed(data: bytes) -> RelayedMessage:
    """Decode a relayed stage-link message (raises msgspec.DecodeError / ValidationError)."""
    return _relayed_decoder.decode(data)


def decode_scheduler_record(data: bytes) -> SchedulerRecord:
    """Decode a DHT scheduler record (raises msgspec.DecodeError / ValidationError)."""
    return _scheduler_record_decoder.decode(data)
