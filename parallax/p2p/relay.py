"""Activations between nodes that cannot reach each other over tcp, carried by Lattica.

Executors always speak ZeroMQ. When a node's agent finds a peer's activation endpoint
unreachable, it opens an outbound relay here: a local PULL socket the executor sends to instead
(PipelineLinks.aliases), drained by one thread per peer that delivers each message with a
Lattica stream call and waits for it before the next — so order is kept and at most one call
is in flight per peer pair (two concurrent large streams to one peer can hang Lattica 1.0.21).
A call goes straight to the peer when Lattica can dial it, else through the scheduler's peer,
which both nodes reach for their control plane. When delivery fails the relay drops its socket
for a moment: the executor's link monitor sees the disconnect and fails the requests routed
through that peer at once, as it does for a dead tcp peer.

Lattica does not tell a handler who called, so a relay admits a message by what it carries:
frames sealed with a link key the scheduler handed to the target's pipeline (only joined nodes
get one; link_auth.py), in a well-formed RelayedMessage of bounded size. A node's relay checks
the seal with its own key (and drops replays); the scheduler's relay forwards only to a joined
peer and only what that peer's pipeline key sealed. No caller holds a target's lock for long:
waiting for it and the downstream call are both bounded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

import msgspec
import zmq
from lattica import ConnectionHandler, rpc_stream

from parallax.node.link_auth import LinkSecurity, mac_matches, parse_key, read_seal
from parallax.protocol.common import encode
from parallax.protocol.control import PeerEndpoint
from parallax.protocol.p2p import RelayedMessage, decode_relayed

logger = logging.getLogger("parallax.p2p")

PUSH_METHOD = "ActivationRelay.push"
FORWARD_METHOD = "ActivationRelay.forward"
CALL_TIMEOUT_S = 10  # Lattica's LFuture.result() takes whole seconds only
FORWARD_TIMEOUT_S = 5  # the scheduler's downstream call on behalf of one caller
LOCK_WAIT_S = 5.0  # a caller waits this long for a target another caller is sending to
MAX_RELAY_BYTES = 256 * 2**20  # one relayed message, all frames
PROBE_TIMEOUT_S = 1.5
PING_INTERVAL_S = 1.0
RECONNECT_PAUSE_S = 0.5
OK = b"ok"


async def probe_tcp(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """Connect to a `tcp://host:port` endpoint: "open", "refused" (the host answers but
    nothing listens, e.g. an executor still loading) or "unreachable" (no route, timeout)."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout_s)
    except ConnectionRefusedError:
        return "refused"
    except (OSError, TimeoutError, ValueError):
        return "unreachable"
    writer.close()
    return "open"


class ActivationRelay(ConnectionHandler):
    """Inbound: deliver relayed frames to this node's executor, or (on the scheduler) pass them
    on to the target peer. Outbound: one relay thread per unreachable peer."""

    @rpc_stream
    def push(self, data):  # declared for Lattica; raw handlers are attached below
        raise NotImplementedError

    @rpc_stream
    def forward(self, data):
        raise NotImplementedError

    def __init__(self, peer, local_endpoint: str | None = None,
                 scheduler_peer_id: str | None = None) -> None:
        self.peer = peer
        self.scheduler_peer_id = scheduler_peer_id
        self.context = zmq.Context.instance()
        self.local_push = None
        self.lock = threading.Lock()  # handlers run concurrently; a zmq socket is not threadsafe
        if local_endpoint is not None:
            self.local_push = self.context.socket(zmq.PUSH)
            self.local_push.setsockopt(zmq.LINGER, 0)
            self.local_push.setsockopt(zmq.SNDHWM, 10_000)
            self.local_push.connect(local_endpoint)
        self.directory: str | None = None  # ipc sockets of outbound relays, made on first use
        self.outbound: dict[str, _Outbound] = {}  # endpoint -> its relay
        self.target_locks: dict[str, threading.Lock] = {}
        self._names = itertools.count()
        self._peer_id: str | None = None
        self.security = LinkSecurity()  # node: the pipeline key from the heartbeat (none yet)
        # scheduler: the keys a message to a peer may be sealed with, None if it did not join
        self.forward_keys: Callable[[str], list[bytes] | None] | None = None
        super().__init__(peer)

    @property
    def peer_id(self) -> str:
        if self._peer_id is None:
            self._peer_id = self.peer.peer_id()
        return self._peer_id

    def set_link_key(self, key: str) -> None:
        """Node: the pipeline's link key (hex, from the heartbeat answer; "" for none)."""
        with self.lock:
            self.security.update(parse_key(key), ())

    # ---- inbound -----------------------------------------------------------------------

    def on_push(self, data: bytes) -> bytes:
        """Frames for our executor (never raises: Lattica would retry and hide the error)."""
        if self.local_push is None:
            return b"error: no executor here"
        try:
            message = relayed_message(data)
            if message.target_peer_id != self.peer_id:
                return b"error: this message is for another peer"
            if not message.frames:
                return OK  # a liveness ping
            if not self.lock.acquire(timeout=LOCK_WAIT_S):
                return b"error: busy"
            try:
                problem = self.security.check(message.frames)
                if problem is None:
                    self.local_push.send_multipart(message.frames, zmq.NOBLOCK)
            finally:
                self.lock.release()
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, zmq.ZMQError) as exc:
            return f"error: {exc}".encode()
        if problem is not None:
            logger.warning("relay: dropped a message for this executor: %s", problem)
            return f"error: refused: {problem}".encode()
        return OK

    def on_forward(self, data: bytes) -> bytes:
        """Scheduler: pass a message on to the peer it is for (a joined peer, sealed with its
        pipeline's key)."""
        try:
            message = relayed_message(data)
            target = message.target_peer_id
            keys = self.forward_keys(target) if self.forward_keys is not None else None
            if keys is None:
                return b"error: refused: the target is not a joined peer"
            if message.frames:
                seal = read_seal(message.frames[0])
                if seal is None or not mac_matches(keys, seal, message.frames[1:]):
                    return b"error: refused: not sealed with the target pipeline's key"
            lock = self._target_lock(target)
            if not lock.acquire(timeout=LOCK_WAIT_S):  # one call in flight per target
                return b"error: busy: another message to this peer is in flight"
            try:
                result = self.peer.get_client(target).call_stream(PUSH_METHOD, data).result(
                    timeout=FORWARD_TIMEOUT_S)
            finally:
                lock.release()
            return bytes(result)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return f"error: {exc}".encode()
        except Exception as exc:  # Lattica raises RuntimeError / TimeoutError variants
            return f"error: cannot reach the target: {str(exc).splitlines()[0]}".encode()

    def _target_lock(self, peer_id: str) -> threading.Lock:
        with self.lock:
            return self.target_locks.setdefault(peer_id, threading.Lock())

    # ---- outbound ----------------------------------------------------------------------

    def open(self, endpoint: str, peer_id: str) -> str:
        """The local endpoint to send to instead of `endpoint` (a relay to `peer_id`)."""
        relay = self.outbound.get(endpoint)
        if relay is None or relay.peer_id != peer_id:
            if relay is not None:
                relay.stop()
            self.directory = self.directory or tempfile.mkdtemp(prefix="parallax-relay-")
            path = os.path.join(self.directory, f"out-{next(self._names)}")
            relay = _Outbound(self, f"ipc://{path}", peer_id)
            self.outbound[endpoint] = relay
        return relay.address

    def routes(self, peer_id: str) -> list[tuple[str, str]]:
        """(peer to call, method): straight to the peer, else through the scheduler."""
        routes = [(peer_id, PUSH_METHOD)]
        if self.scheduler_peer_id:
            routes.append((self.scheduler_peer_id, FORWARD_METHOD))
        return routes

    def deliver(self, peer_id: str, frames: list[bytes], first_route: int = 0) -> int | None:
        """One message to `peer_id`; the index of the route that delivered it, or None."""
        data = encode(RelayedMessage(peer_id, frames))
        routes = self.routes(peer_id)
        for index in [*range(first_route, len(routes)), *range(first_route)]:
            via, method = routes[index]
            try:
                answer = self.peer.get_client(via).call_stream(method, data).result(
                    timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # unreachable this way: try the next route
                logger.debug("relay to %s via %s failed: %s", peer_id, via, exc)
                continue
            if bytes(answer) == OK:
                return index
            logger.warning("relay to %s via %s: %s", peer_id, via, bytes(answer)[:200])
        return None

    def close_endpoint(self, endpoint: str) -> None:
        relay = self.outbound.pop(endpoint, None)
        if relay is not None:
            relay.stop()

    def close(self) -> None:
        for relay in self.outbound.values():
            relay.stop()
        if self.local_push is not None:
            self.local_push.close(linger=0)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def relayed_message(data: bytes) -> RelayedMessage:
    """Decode and bound a relayed message (ValueError / msgspec errors when malformed): no
    frames (a ping), or a stage message's 2 or 3 frames, MAX_RELAY_BYTES in all."""
    if len(data) > MAX_RELAY_BYTES:
        raise ValueError(f"a relayed message of {len(data)} bytes is too large")
    message = decode_relayed(data)
    if len(message.frames) not in (0, 2, 3):
        raise ValueError(f"{len(message.frames)} frames is no stage message")
    return message


ActivationRelay._handle_stream_push = ActivationRelay.on_push
ActivationRelay._handle_stream_forward = ActivationRelay.on_forward


class _Outbound:
    """A local PULL socket drained into Lattica calls to one peer, in order, one at a time."""

    def __init__(self, relay: ActivationRelay, address: str, peer_id: str) -> None:
        self.relay = relay
        self.address = address
        self.peer_id = peer_id
        self.route = 0  # index into relay.routes(peer_id) that worked last
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"relay-{peer_id[-6:]}",
                                       daemon=True)
        self.thread.start()

    def _bind(self) -> zmq.Socket:
        pull = self.relay.context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self.address)
        return pull

    def _run(self) -> None:
        pull = self._bind()
        last_delivered = time.monotonic()
        reported = False  # a dead peer is logged once, not on every ping
        try:
            while not self.stopped.is_set():
                if pull.poll(200):
                    frames = pull.recv_multipart()
                elif time.monotonic() - last_delivered >= PING_INTERVAL_S:
                    # a stage waiting for this peer's tokens sends nothing: ping, so a dead
                    # peer is noticed as fast as a dropped tcp link would be
                    frames = []
                else:
                    continue
                route = self.relay.deliver(self.peer_id, frames, self.route)
                if route is not None:
                    if route != self.route:
                        logger.info("activations to %s go via route %d", self.peer_id, route)
                    self.route = route  # keep what worked: a failed dial costs retries
                    last_delivered, reported = time.monotonic(), False
                    continue
                # the peer is gone: a disconnect tells the executor to fail its requests
                if not reported:
                    logger.warning("relay to peer %s failed; dropping the link", self.peer_id)
                    reported = True
                pull.close(linger=0)
                time.sleep(RECONNECT_PAUSE_S)
                pull = self._bind()
                last_delivered = time.monotonic()
        finally:
            pull.close(linger=0)

    def stop(self) -> None:
        self.stopped.set()


class RelayedLinks:
    """A node's view of its P2P peers: which activation endpoints it reaches over tcp, and a
    relay for each one it does not (probed once per peer, from heartbeat responses)."""

    def __init__(self, relay: ActivationRelay, say=logger.info) -> None:
        self.relay = relay
        self.say = say
        self.probed: dict[str, str] = {}  # activation endpoint -> peer id it was probed for
        self.aliases: dict[str, str] = {}  # endpoint -> local relay endpoint

    async def update(self, peers: list[PeerEndpoint], own: str) -> dict[str, str] | None:
        """Probe new peers, drop gone ones; the new alias map when it changed, else None."""
        before = dict(self.aliases)
        listed = {p.activation_endpoint for p in peers}
        for endpoint in [e for e in self.probed if e not in listed]:  # evicted or left
            del self.probed[endpoint]
            self._direct(endpoint)
        fresh = [p for p in peers if p.activation_endpoint != own
                 and self.probed.get(p.activation_endpoint) != p.peer_id]
        verdicts = await asyncio.gather(*(probe_tcp(p.activation_endpoint) for p in fresh))
        for peer, verdict in zip(fresh, verdicts, strict=True):
            endpoint = peer.activation_endpoint
            if verdict == "refused" and not peer.ready:
                continue  # its executor is not listening yet: probe again next heartbeat
            self.probed[endpoint] = peer.peer_id
            if verdict == "open":
                self._direct(endpoint)
                continue
            self.aliases[endpoint] = self.relay.open(endpoint, peer.peer_id)
            self.say(f"{endpoint} is not reachable over tcp: activations to peer "
                     f"{peer.peer_id} go through Lattica")
        return dict(self.aliases) if self.aliases != before else None

    def _direct(self, endpoint: str) -> None:
        if self.aliases.pop(endpoint, None) is not None:
            self.relay.close_endpoint(endpoint)
