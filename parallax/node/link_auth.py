"""Authenticated stage links: a seal on every stage message, replays dropped, keys rotated.

The scheduler hands every node of a pipeline the same random key in its heartbeat answers
(parallax/scheduler/link_keys.py). A sender puts a `LinkSeal` in front of each message: an
HMAC-SHA256 under that key over a random session id of the sending PipelineLinks, a sequence
number that grows with every message it sends, and every frame of the message. A receiver
checks the MAC before it decodes anything, and keeps the last sequence number per session (a
bounded LRU): a message that is not newer than the last one of its session is a replay and is
dropped. The seal survives the P2P relay hop unchanged (relays pass the frames as they are).

Key rotation: a new key arrives when the pipeline's composition changes. The previous key is
still accepted for PREVIOUS_KEY_GRACE_S, so messages signed just before the change and still in
flight are not lost; the scheduler routes to a pipeline only once every node reports (by
`key_id`) that its executor holds the current key.

Residual risk: a restarted executor starts with an empty LRU, so a message captured under the
current key could be replayed to it once per captured session. Such a replay can only touch
requests by id (almost always finished ones: ids are random per request); it ends as soon as
the key rotates, which happens whenever the pipeline's composition changes or the scheduler
restarts. Encrypting the links (issue 11 item 14, CURVE) also stops the capture in the first
place.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import msgspec

from parallax.protocol.common import encode
from parallax.protocol.links import LinkSeal, decode_seal

DOMAIN = b"parallax-stage-link-v1"
KEY_BYTES = 32
SESSION_BYTES = 16
PREVIOUS_KEY_GRACE_S = 30.0
MAX_SESSIONS = 4096  # senders remembered for replay checks (each sending executor is one)
_TCP_ENDPOINT = re.compile(r"tcp://(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\]):"
                           r"(\d{1,5})")


class NoLinkKey(Exception):
    """This stage has no link key from the scheduler yet, so it cannot sign messages."""


def is_tcp_endpoint(endpoint: str) -> bool:
    """`tcp://host:port` and nothing else (no path, no wildcard, no other transport)."""
    match = _TCP_ENDPOINT.fullmatch(endpoint) if isinstance(endpoint, str) else None
    return match is not None and 0 < int(match.group(1)) < 65536


def parse_key(text: str) -> bytes | None:
    """A hex link key from the scheduler; None for "" (no key) or anything malformed."""
    try:
        key = bytes.fromhex(text)
    except (ValueError, TypeError):
        return None
    return key if len(key) == KEY_BYTES else None


def key_id(key: bytes | None) -> str:
    """A fingerprint that names a key without revealing it ("" for no key)."""
    if not key:
        return ""
    return hashlib.sha256(b"parallax-link-key-id" + key).hexdigest()[:16]


def compute_mac(key: bytes, session: bytes, seq: int, frames: Sequence) -> bytes:
    """HMAC-SHA256 over the session, the sequence number and every frame (length-prefixed)."""
    mac = hmac.new(key, DOMAIN, hashlib.sha256)
    mac.update(session)
    mac.update(seq.to_bytes(8, "big"))
    mac.update(len(frames).to_bytes(4, "big"))
    for frame in frames:
        view = memoryview(frame)
        mac.update(view.nbytes.to_bytes(8, "big"))
        mac.update(view)
    return mac.digest()


def mac_matches(keys: Iterable[bytes], seal: LinkSeal, frames: Sequence) -> bool:
    """Whether `seal` was made with one of `keys` over `frames` (no replay check)."""
    return any(hmac.compare_digest(compute_mac(key, seal.session, seal.seq, frames), seal.mac)
               for key in keys)


def read_seal(data) -> LinkSeal | None:
    """The seal of frame 0, or None when it is not one."""
    try:
        seal = decode_seal(bytes(data))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if len(seal.session) != SESSION_BYTES or len(seal.mac) != 32 or not 0 < seal.seq < 2**63:
        return None
    return seal


class LinkSecurity:
    """One executor's link key(s), its pipeline's endpoints, its send counter, its replay LRU."""

    def __init__(self, key: bytes | None = None, peers: Iterable[str] = (), *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.session = os.urandom(SESSION_BYTES)
        self._seq = 0
        self.key: bytes | None = None
        self.previous: bytes | None = None
        self.previous_until = 0.0
        self.peers: frozenset[str] = frozenset()
        self._last_seq: OrderedDict[bytes, int] = OrderedDict()
        self.update(key, peers)

    @property
    def key_id(self) -> str:
        return key_id(self.key)

    def update(self, key: bytes | None, peers: Iterable[str]) -> None:
        """Install the scheduler's latest key and endpoints; the old key stays valid a while."""
        self.peers = frozenset(p for p in peers if is_tcp_endpoint(p))
        if key == self.key:
            return
        if self.key is not None:
            self.previous, self.previous_until = self.key, self.clock() + PREVIOUS_KEY_GRACE_S
        self.key = key

    def allows(self, endpoint: str) -> bool:
        """Whether the scheduler listed `endpoint` for this node's pipeline."""
        return endpoint in self.peers

    def seal(self, frames: Sequence) -> bytes:
        """Frame 0 for a message made of `frames` (raises NoLinkKey without a key)."""
        if self.key is None:
            raise NoLinkKey("this stage has no link key from the scheduler yet")
        self._seq += 1
        return encode(LinkSeal(self.session, self._seq,
                                    compute_mac(self.key, self.session, self._seq, frames)))

    def check(self, frames: Sequence) -> str | None:
        """None when frames[0] seals frames[1:] under a valid key and is newer than the last
        message of its session (then it counts as seen); else why it must be dropped."""
        if self.key is None:
            return "this stage has no link key yet"
        seal = read_seal(frames[0])
        if seal is None:
            return "no valid seal frame"
        keys = [self.key]
        if self.previous is not None and self.clock() < self.previous_until:
            keys.append(self.previous)
        if not mac_matches(keys, seal, frames[1:]):
            return "bad MAC (unsigned, or signed with another key)"
        last = self._last_seq.get(seal.session, 0)
        if seal.seq <= last:
            return f"replayed (sequence {seal.seq} <= {last})"
        self._last_seq[seal.session] = seal.seq
        self._last_seq.move_to_end(seal.session)
        while len(self._last_seq) > MAX_SESSIONS:
            self._last_seq.popitem(last=False)
        return None
