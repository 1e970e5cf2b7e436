"""ZeroMQ tcp links between the executors of a pipeline.

Each executor binds one PULL socket (its activation endpoint) and connects one PUSH socket per
peer it sends to. A socket monitor on every PUSH reports a peer that went away (process killed,
host gone): the requests routed through it are failed at once instead of hanging. A peer that
never accepts the connection is detected by a bounded wait for writability.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import msgspec
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from parallax import protocol as P

logger = logging.getLogger("parallax.peers")

CONNECT_WAIT_MS = 3000  # how long a fresh link may take to connect before its peer counts as down


@dataclass
class Route:
    """Where one request's data goes from this stage."""

    next_endpoint: str | None  # None on the last stage
    downstream_after_next: list[str]
    head_endpoint: str


class PeerUnreachable(Exception):
    def __init__(self, endpoint: str) -> None:
        super().__init__(f"cannot reach the next stage at {endpoint}")
        self.endpoint = endpoint


class PipelineLinks:
    """The activation endpoint of this executor and its outgoing links."""

    def __init__(self, context: zmq.Context, bind_address: str, own_endpoint: str) -> None:
        self.context = context
        self.own_endpoint = own_endpoint
        self.pull = context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(bind_address)
        self.pushes: dict[str, zmq.Socket] = {}
        self.monitors: dict[zmq.Socket, str] = {}
        self.routes: dict[str, Route] = {}
        self.aliases: dict[str, str] = {}  # endpoint -> local relay endpoint (P2P fallback)

    def close(self) -> None:
        for socket in [self.pull, *self.pushes.values(), *self.monitors]:
            socket.close(linger=0)

    # ---- outgoing ----------------------------------------------------------------------

    def _push(self, endpoint: str) -> zmq.Socket:
        socket = self.pushes.get(endpoint)
        if socket is None:
            socket = self.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not connected
            socket.setsockopt(zmq.SNDHWM, 10_000)
            socket.setsockopt(zmq.RECONNECT_IVL, 200)
            socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
            monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            socket.connect(self.aliases.get(endpoint, endpoint))
            self.pushes[endpoint] = socket
            self.monitors[monitor] = endpoint
        return socket

    def set_aliases(self, aliases: dict[str, str]) -> None:
        """Route these endpoints through local relays from now on (reconnecting if needed)."""
        for endpoint in aliases.keys() | self.aliases.keys():
            if aliases.get(endpoint) != self.aliases.get(endpoint):
                self._drop(endpoint)  # reconnects to the new target when next used
        self.aliases = dict(aliases)

    def send(self, endpoint: str, frames: list) -> None:
        """Send a multipart message; PeerUnreachable when the peer does not take it in time."""
        socket = self._push(endpoint)
        try:
            socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return
        except zmq.Again:
            pass
        if socket.poll(CONNECT_WAIT_MS, zmq.POLLOUT):
            socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return
        self._drop(endpoint)
        raise PeerUnreachable(endpoint)

    def _drop(self, endpoint: str) -> None:
        socket = self.pushes.pop(endpoint, None)
        if socket is None:
            return
        for monitor, monitored in list(self.monitors.items()):
            if monitored == endpoint:
                del self.monitors[monitor]
                monitor.close(linger=0)
        socket.close(linger=0)

    def send_activations(self, endpoint: str, entries: list[P.ActivationEntry],
                         hidden: torch.Tensor) -> None:
        """hidden: [sum of entries' tokens, hidden_size], rows in entry order."""
        hidden = hidden.contiguous()
        header = P.StageActivations(entries, str(hidden.dtype).removeprefix("torch."),
                                    hidden.shape[-1])
        payload = hidden.cpu().view(torch.uint8).numpy()  # raw bytes, zero-copy on CPU
        self.send(endpoint, [P.encode(header), memoryview(payload)])

    def send_message(self, endpoint: str, message: msgspec.Struct) -> None:
        self.send(endpoint, [P.encode(message)])

    def disconnected_peers(self) -> list[str]:
        """Endpoints whose connection dropped since the last call (non-blocking)."""
        gone = []
        for monitor, endpoint in list(self.monitors.items()):
            while monitor.poll(0):
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    gone.append(endpoint)
        for endpoint in set(gone):
            self._drop(endpoint)  # reconnect lazily, with a fresh monitor, if used again
        return sorted(set(gone))

    # ---- incoming ----------------------------------------------------------------------

    def receive(self) -> tuple[P.StageActivations | P.StageTokens | P.StageRelease,
                               torch.Tensor | None] | None:
        """One message if available (non-blocking): (header, hidden [T, H] or None)."""
        try:
            frames = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        message = P.decode_stage(frames[0].bytes)
        if isinstance(message, P.StageActivations):
            dtype = getattr(torch, message.dtype)
            # [T * H] of the sender's dtype -> [T, H]; clone so the frame can be released
            hidden = torch.frombuffer(frames[1].buffer, dtype=dtype).view(
                -1, message.hidden_size).clone()
            return message, hidden
        return message, None


def wall_ms() -> float:
    return time.perf_counter() * 1000
