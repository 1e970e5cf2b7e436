"""HTTP over Lattica streams, so P2P mode reuses every HTTP endpoint as it is.

A peer that serves (the scheduler; a node for chat forwarding) registers `HttpBridge`, which
replays each incoming `BridgeRequest` against its own local HTTP server, for an allow-list of
paths only, and streams the answer back frame by frame. A caller mounts `LatticaTransport` in
an httpx client: requests then travel to a peer instead of a socket, and streamed answers (SSE)
arrive as they are produced. Authentication is unchanged: the join token and API key travel as
the same headers and the local server checks them. Every replayed request carries the relayed
marker (any copy the caller sent is replaced), so the local server never takes a remote peer
for a loopback client (see parallax/serving/security.py).

Every frame is msgpack we encode ourselves (protocol/p2p.py Bridge*); raw `_handle_*` methods bypass
Lattica's pickling in both directions. A peer's handler that raises would be retried three
times by Lattica and its error swallowed mid-stream, so failures are sent as frames instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
from lattica import ConnectionHandler, rpc_stream_iter

from parallax.p2p.peer import PEER_HEADER
from parallax.protocol.common import encode
from parallax.protocol.p2p import (
    BridgeBody,
    BridgeEnd,
    BridgeHead,
    BridgeRequest,
    decode_bridge_frame,
    decode_bridge_request,
)
from parallax.serving.security import mark_relayed

logger = logging.getLogger("parallax.p2p")

METHOD = "HttpBridge.http"
# the forwarding headers too: the local server trusts them from loopback (uvicorn's proxy
# headers), and a remote peer must not choose the client address it is taken for
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host",
                PEER_HEADER, "forwarded", "x-forwarded-for", "x-forwarded-host",
                "x-forwarded-proto", "x-real-ip"}

# POST /scheduler/init needs the operator's API key over P2P: a relayed call is never loopback
SCHEDULER_PATHS = ("/node/join", "/node/heartbeat", "/node/leave", "/v1/chat/completions",
                   "/v1/models", "/cluster/status", "/cluster/status_json", "/model/list",
                   "/node/join/command", "/scheduler/init")
NODE_PATHS = ("/v1/chat/completions", "/health")


# Lattica calls that can block run here, never on the event loop: opening a call blocks while
# it dials (one made during another dial of the same peer was seen to block for good), and so
# can cancelling one. A pool of their own keeps such threads from starving asyncio's default
# executor; callers give up after their timeout.
_BLOCKING = ThreadPoolExecutor(max_workers=32, thread_name_prefix="lattica-call")


def _pass(headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS]


def _error_frames(status: int, message: str) -> list[bytes]:
    body = json.dumps({"object": "error", "message": message, "type": "p2p_error",
                       "code": status}).encode()
    return [encode(BridgeHead(status, [("content-type", "application/json")])),
            encode(BridgeBody(body)), encode(BridgeEnd())]


class HttpBridge(ConnectionHandler):
    """Serves `HttpBridge.http` by replaying requests against `local_url` (allowed paths only)."""

    @rpc_stream_iter
    def http(self, data):  # declared for Lattica; the raw handler below does the work
        raise NotImplementedError

    def __init__(self, peer, local_url: str, allowed_paths: tuple[str, ...],
                 read_timeout_s: float = 600.0) -> None:
        self.allowed_paths = allowed_paths
        self.client = httpx.Client(
            base_url=local_url, trust_env=False,
            timeout=httpx.Timeout(read_timeout_s, connect=5.0, pool=30.0))
        super().__init__(peer)

    def close(self) -> None:
        self.client.close()

    def serve(self, data: bytes) -> Iterator[bytes]:
        """One incoming call: the answer's frames (never raises)."""
        try:
            request = decode_bridge_request(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return iter(_error_frames(400, f"malformed bridge request: {exc}"))
        path = request.path.split("?", 1)[0]
        if path not in self.allowed_paths:
            return iter(_error_frames(404, f"{path} is not served over P2P"))
        return self._relay(request)

    def _relay(self, request: BridgeRequest) -> Iterator[bytes]:
        head_sent = False
        try:
            with self.client.stream(request.method, request.path, content=request.body,
                                    headers=mark_relayed(_pass(request.headers), "p2p")) \
                    as response:
                yield encode(BridgeHead(response.status_code,
                                        _pass(response.headers.multi_items())))
                head_sent = True
                for chunk in response.iter_raw():
                    yield encode(BridgeBody(chunk))
            yield encode(BridgeEnd())
        except httpx.HTTPError as exc:
            logger.warning("P2P bridge: %s %s failed: %r", request.method, request.path, exc)
            if head_sent:
                yield encode(BridgeEnd(error=f"the local server failed: {exc!r}"))
            else:
                yield from _error_frames(502, f"the local server failed: {exc!r}")


# Lattica's metaclass overwrites `_handle_stream_iter_<name>` defined in the class body with its
# own pickling handler, so the raw handler is attached after the class exists.
HttpBridge._handle_stream_iter_http = HttpBridge.serve


def _cancel(call) -> None:
    """Cancel a Lattica stream call without waiting: StreamIter.cancel() can block for good
    (seen on a stream whose peer had gone), and it must never block the event loop."""
    _BLOCKING.submit(call.cancel)


class _FrameStream(httpx.AsyncByteStream):
    """The body of a bridged response: BridgeBody frames until BridgeEnd."""

    def __init__(self, call, frames, read_timeout_s: float | None) -> None:
        self.call = call
        self.frames = frames
        self.read_timeout_s = read_timeout_s
        self.done = False

    async def __aiter__(self):
        while not self.done:
            frame = await _next_frame(self.frames, self.read_timeout_s, self.call)
            if isinstance(frame, BridgeBody):
                yield frame.data
                continue
            self.done = True
            if frame is None:
                raise httpx.RemoteProtocolError("the peer's stream was cut mid-answer")
            if isinstance(frame, BridgeEnd) and frame.error:
                raise httpx.RemoteProtocolError(frame.error)

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            _cancel(self.call)  # the peer's handler stops, closing its local request


async def _next_frame(frames, timeout_s: float | None, call):
    """The next decoded frame, None at the end of the stream; httpx errors otherwise."""
    try:
        data = await asyncio.wait_for(frames.__anext__(), timeout_s)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        _cancel(call)
        raise httpx.ReadTimeout(f"the peer sent nothing for {timeout_s:g} s") from None
    except RuntimeError as exc:  # Lattica: the peer is unreachable or the call failed
        raise httpx.ConnectError(f"P2P call failed: {exc}".split("\n")[0]) from None
    try:
        return decode_bridge_frame(bytes(data))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        _cancel(call)
        raise httpx.RemoteProtocolError(f"malformed frame from the peer: {exc}") from None


class LatticaTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests to a peer's HttpBridge: the one named in the `x-parallax-peer`
    header, else `default_peer_id`; requests naming no peer go to `fallback` (plain HTTP)."""

    def __init__(self, peer, default_peer_id: str | None = None,
                 fallback: httpx.AsyncBaseTransport | None = None) -> None:
        self.peer = peer
        self.default_peer_id = default_peer_id
        self.fallback = fallback

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        peer_id = request.headers.get(PEER_HEADER) or self.default_peer_id
        if peer_id is None:
            if self.fallback is None:
                raise httpx.ConnectError("no P2P peer named for this request", request=request)
            return await self.fallback.handle_async_request(request)
        timeouts = request.extensions.get("timeout", {})
        first_timeout = _sum(timeouts.get("connect"), timeouts.get("read"))
        message = BridgeRequest(request.method, request.url.raw_path.decode("ascii"),
                                _pass(request.headers.multi_items()), await request.aread())
        call = await self._open(peer_id, encode(message), timeouts.get("connect"), request)
        frames = call.__aiter__()
        try:
            head = await _next_frame(frames, first_timeout, call)
        except httpx.HTTPError as exc:
            exc.request = request
            raise
        if not isinstance(head, BridgeHead):
            if head is not None:  # an ended stream has nothing to cancel
                _cancel(call)
            raise httpx.RemoteProtocolError(f"peer {peer_id} closed the stream before answering",
                                            request=request)
        return httpx.Response(head.status, headers=head.headers,
                              stream=_FrameStream(call, frames, timeouts.get("read")),
                              request=request)

    async def _open(self, peer_id: str, data: bytes, timeout_s: float | None,
                    request: httpx.Request):
        """Start the call, retrying while the peer is being dialled (nothing was sent yet)."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 30.0)
        delay = 0.05
        loop = asyncio.get_running_loop()
        while True:
            opening = loop.run_in_executor(
                _BLOCKING, lambda: self.peer.get_client(peer_id).call_stream_iter(METHOD, data))
            try:
                # bounded: Lattica can block here (see _BLOCKING) instead of failing
                return await asyncio.wait_for(opening, max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise httpx.ConnectError(f"cannot reach peer {peer_id}: no answer in time",
                                         request=request) from None
            except RuntimeError as exc:
                if time.monotonic() + delay > deadline:
                    reason = str(exc).split("\n")[0]
                    raise httpx.ConnectError(f"cannot reach peer {peer_id}: {reason}",
                                             request=request) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def aclose(self) -> None:
        if self.fallback is not None:
            await self.fallback.aclose()


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(values)
