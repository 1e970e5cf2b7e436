"""Encrypted stage links: ZeroMQ CURVE on the activation sockets of nodes that run with TLS.

A node started with `--tls-certfile/--tls-keyfile` tells its executor to encrypt
(`ExecutorConfig.link_encryption`). The executor makes a CURVE key pair when it starts (the
secret never leaves that process), serves its activation PULL socket as a CURVE server, and
reports the public key in `ExecutorReady`; the node passes it on in its heartbeats, and the
scheduler hands every node of a pipeline its peers' public keys next to their endpoints
(`HeartbeatResponse.link_curve_keys`). A PUSH to a peer with a key is a CURVE client of it, so
everything on the wire (hidden states, token ids, request ids) is encrypted, and the peer is the
one holding that key. Authentication of what is inside stays the link seal's job (link_auth.py):
CURVE accepts any client key, the seal proves the sender belongs to the pipeline.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from parallax.node.link_auth import key_id

CURVE_KEY_CHARS = 40  # a 32-byte key in Z85


def is_curve_key(text: object) -> bool:
    """Whether `text` is a Z85-encoded 32-byte CURVE public key."""
    if not isinstance(text, str) or len(text) != CURVE_KEY_CHARS:
        return False
    try:
        return len(z85.decode(text.encode("ascii"))) == 32
    except (ValueError, KeyError, UnicodeEncodeError, struct.error):
        return False


@dataclass(frozen=True)
class CurveKeyPair:
    """One CURVE key pair (Z85 bytes, as libzmq takes them)."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> CurveKeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


def serve_curve(socket: zmq.Socket, keys: CurveKeyPair) -> None:
    """Make `socket` (before it binds) accept only CURVE-encrypted connections."""
    socket.curve_server = True
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public


def connect_curve(socket: zmq.Socket, server_key: str, keys: CurveKeyPair) -> None:
    """Make `socket` (before it connects) a CURVE client of the peer whose public key is
    `server_key`; ValueError for a malformed key."""
    if not is_curve_key(server_key):
        raise ValueError("malformed CURVE key")
    socket.curve_serverkey = server_key.encode("ascii")
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret


def link_fingerprint(key: bytes | None, curve_keys: Sequence[str] = ()) -> str:
    """What a node reports holding: its pipeline's link key and its peers' CURVE keys.

    The scheduler routes to a pipeline only once every node reports the fingerprint of its
    current grant, so no request goes out while a stage still lacks a peer's new CURVE key."""
    if not key:
        return ""
    if not any(curve_keys):
        return key_id(key)
    return key_id(key + "\n".join(curve_keys).encode("ascii", "replace"))


def curve_support() -> bool:
    """Whether this libzmq was built with CURVE (pyzmq's wheels are)."""
    return bool(zmq.has("curve"))
