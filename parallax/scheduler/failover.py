"""The failover half of the forwarder: continue a request on another pipeline when its own
breaks, and avoid the nodes a failure named.

`FailoverMixin` is mixed into `parallax.scheduler.forward.Forwarder` (which provides placing:
`pick`, `_acquire`, `_send`, `release`, `_close`); the bookkeeping of one request across its
attempts is the pure `parallax.scheduler.replay.ReplaySession`. The client-facing flow:

- `_drive` relays the current attempt (`_read_attempt`: chunks rewritten by the session, cut
  as soon as a node of its pipeline is gone), and when it fails without a final chunk decides
  (`replay.should_replay`) to place it again (`_replace`: keep-alives while no complete
  pipeline takes it, up to `replay_wait_s`) or to end the stream with the error event.
- `_collect` drives the same for a non-streaming client and answers one completion.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from parallax.p2p.peer import PEER_HEADER
from parallax.protocol.common import INVALID_REQUEST, PEER_LOST
from parallax.scheduler.replay import KEEPALIVE, Failure, ReplaySession, SSELines, should_replay
from parallax.scheduler.traces import TraceStore, attempt_trace
from parallax.serving import sse
from parallax.serving.errors import APIError, error_body
from parallax.serving.sse import DONE, encode_event

if TYPE_CHECKING:
    from parallax.scheduler.forward import Forwarder, Ticket

logger = logging.getLogger("parallax.scheduler")

# a node named in a failure is avoided until it heartbeats this long after the failure
# (a dead one never does, and is evicted; a live one is trusted again)
SUSPECT_CLEAR_S = 2.0
# how long the scheduler waits for a suspect node's /health before leaving it to the heartbeat
PROBE_TIMEOUT_S = 2.0
_JSON = "application/json"


class _Retryable(Exception):
    """A head could not take the request (unreachable, 429, 503): try another pipeline."""

    def __init__(self, error: APIError, reason: str) -> None:
        super().__init__(error.message)
        self.error, self.reason = error, reason


def _error_message(body: bytes, fallback: str) -> str:
    try:
        obj = msgspec.json.decode(body)
        return str(obj.get("message") or fallback) if isinstance(obj, dict) else fallback
    except msgspec.DecodeError:
        return fallback


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass



def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class FailoverMixin:
    """Replay on failure for the Forwarder (see the module docstring)."""

    def _init_failover(self) -> None:
        self.active: dict[str, Ticket] = {}  # placed and not released, by attempt rid
        self.suspects: dict[str, float] = {}  # node id -> when a failure named it
        # called with a suspect whose HTTP port refuses connections: its process is gone, so
        # the scheduler need not wait for the heartbeat timeout to rebuild without it
        self.on_unreachable: Callable[[str], None] | None = None
        self._probes: dict[str, asyncio.Task] = {}
        self.traces = TraceStore()  # GET /v1/traces/{id}: every attempt of recent requests

    def _cut_broken(self) -> None:
        """Cut the tickets whose pipeline lost a node (evicted, left)."""
        nodes = self.registry.nodes
        for ticket in self.active.values():
            if not ticket.broken.is_set() and any(n not in nodes for n in ticket.node_ids):
                ticket.broken.set()

    def suspect(self, node_id: str) -> None:
        """Avoid pipelines through `node_id` for now: a failure named it; and ask the node
        whether it is still there."""
        if node_id in self.registry.nodes:
            self.suspects[node_id] = time.monotonic()
            if self.on_unreachable is not None and node_id not in self._probes:
                self._probes[node_id] = asyncio.ensure_future(self._probe(node_id))

    async def _probe(self, node_id: str) -> None:
        """Connection refused on the node's HTTP port: its process is gone (a timeout proves
        nothing — a slow network or a busy node — and is left to the heartbeat timeout)."""
        try:
            record = self.registry.nodes.get(node_id)
            if record is None:
                return
            try:
                # a P2P node over Lattica by peer id, as its chats go: the scheduler never
                # dials the address such a node advertised (nothing checked it; admission.py)
                headers = {PEER_HEADER: record.peer_id} if record.peer_id else None
                await self.client.get(f"{record.http_url}/health", timeout=PROBE_TIMEOUT_S,
                                      headers=headers)
            except httpx.ConnectError:
                if self.registry.nodes.get(node_id) is record and self.on_unreachable:
                    self.on_unreachable(node_id)
            except (httpx.HTTPError, OSError):
                pass
        finally:
            self._probes.pop(node_id, None)

    def is_suspect(self, node_id: str) -> bool:
        since = self.suspects.get(node_id)
        if since is None:
            return False
        record = self.registry.nodes.get(node_id)
        if record is None or record.last_seen >= since + SUSPECT_CLEAR_S:
            del self.suspects[node_id]
            return False
        return True

    def node_of_endpoint(self, endpoint: str | None) -> str | None:
        """The node whose activation endpoint this is."""
        for node_id, record in self.registry.nodes.items():
            if endpoint and record.activation_endpoint == endpoint:
                return node_id
        return None

    async def _drive(self, attempt: _Attempt, session: ReplaySession) -> AsyncIterator[bytes]:
        """Client bytes of one request across attempts: chunks, keep-alives while no pipeline
        is there to continue on, and [DONE] (after an error event when it gives up)."""
        attempts: list[dict[str, Any]] = []  # their traces
        try:
            while True:
                broke: Failure | None = None
                async for data in self._read_attempt(attempt, session):
                    if isinstance(data, Failure):
                        broke = data
                    else:
                        yield data
                failure = session.end_attempt(broke)
                ticket = attempt.ticket
                attempts.append(attempt_trace(ticket.rid, list(ticket.node_ids),
                                              session.final or session.error_final, failure))
                await attempt.close(self)
                if failure is None:  # complete (a missing [DONE] costs nothing)
                    self.metrics.observe_final(ticket.label, session.final or {})
                    self.metrics.requests.labels(status="200").inc()
                    yield DONE
                    return
                logger.warning("request %s: attempt %s on %s failed (%s): %s", session.client_id,
                               ticket.rid, ticket.label, failure.kind, failure.message)
                if failure.kind != INVALID_REQUEST:  # even when this request gives up
                    self._suspect_after(failure, ticket)
                if not should_replay(failure, session.failovers, self.config.max_replays):
                    break
                session.begin_replay()
                self.metrics.retries.labels(reason="failover").inc()
                async for keepalive in self._replace(attempt, session):
                    yield keepalive
                if attempt.ticket is None:
                    failure = Failure(PEER_LOST, f"the pipeline broke ({failure.message}) and "
                                      f"no complete pipeline took the request over within "
                                      f"{self.config.replay_wait_s:g} s", 503)
                    if attempt.refused is not None:
                        failure = attempt.refused
                    break
            self.metrics.requests.labels(status="error").inc()
            for event in session.give_up(failure):
                yield encode_event(event)
            yield DONE
        finally:
            if attempts:
                final = session.final or {}
                choices = final.get("choices") or [{}]
                self.traces.add(session.client_id, attempts,
                                choices[0].get("finish_reason") if final else "error")
            await attempt.close(self)

    async def _read_attempt(self, attempt: _Attempt,
                            session: ReplaySession) -> AsyncIterator[bytes | Failure]:
        """The current attempt's chunks for the client; a Failure item when it broke (its
        connection failed, or its pipeline lost a node) rather than ended."""
        ticket, response = attempt.ticket, attempt.response
        assert ticket is not None and response is not None
        lines = SSELines()
        chunks = response.aiter_bytes().__aiter__()
        broken = asyncio.ensure_future(ticket.broken.wait())
        try:
            while True:
                read = asyncio.ensure_future(chunks.__anext__())
                await asyncio.wait({read, broken}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    gone = [n for n in ticket.node_ids if n not in self.registry.nodes]
                    yield Failure(PEER_LOST, f"node {', '.join(gone)} of the pipeline is gone")
                    return
                try:
                    data = read.result()
                except StopAsyncIteration:
                    return
                except httpx.HTTPError as exc:
                    logger.warning("request %s: head stream broke: %r", ticket.rid, exc)
                    yield Failure(PEER_LOST, f"the head node {ticket.pipeline[0].node_id} "
                                  f"failed: {exc!r}", head_lost=True)
                    return
                for payload in lines.feed(data):
                    try:
                        event = msgspec.json.decode(payload) if payload != b"[DONE]" else \
                            "[DONE]"
                    except msgspec.DecodeError:
                        continue
                    for out in session.on_event(event):
                        yield encode_event(out)
        finally:
            broken.cancel()

    def _suspect_after(self, failure: Failure, ticket: Ticket) -> None:
        """Keep the next attempts off the node a failure points at."""
        node_id = self.node_of_endpoint(failure.peer)
        if node_id is None and failure.head_lost:
            node_id = ticket.pipeline[0].node_id
        if node_id is not None:
            self.suspect(node_id)

    async def _replace(self, attempt: _Attempt, session: ReplaySession) -> AsyncIterator[bytes]:
        """Place the request again (prompt + ids so far) on a complete pipeline; keep-alives
        while none takes it, up to `replay_wait_s`. Leaves `attempt.ticket` None if none did
        (and `attempt.refused` set when a head refused the replay itself)."""
        deadline = time.monotonic() + self.config.replay_wait_s
        next_keepalive = time.monotonic() + self.config.replay_keepalive_s
        excluded: set[int] = set()
        while True:
            decision = self.pick(excluded)
            if decision.pipeline_index is not None:
                ticket = self._acquire(decision.pipeline_index, session.attempt_rid(),
                                       session.path)
                ticket.payload = session.payload
                try:
                    response = await self._send(ticket, session.attempt_payload())
                except _Retryable as exc:
                    self.release(ticket)
                    logger.info("request %s: replay not taken: %s", session.client_id,
                                exc.error.message)
                    excluded.add(decision.pipeline_index)
                    continue
                except APIError as exc:  # the head did not answer in time
                    self.release(ticket)
                    excluded.add(decision.pipeline_index)
                    logger.info("request %s: replay failed: %s", session.client_id, exc.message)
                    continue
                except BaseException:
                    self.release(ticket)
                    raise
                if response.status_code == 200 and _media_type(response) == sse.MEDIA_TYPE:
                    attempt.ticket, attempt.response = ticket, response
                    return
                body = await _read_quietly(response)
                await self._close(ticket, response)
                attempt.refused = Failure(INVALID_REQUEST, _error_message(
                    body, f"the head refused the replay with HTTP {response.status_code}"),
                    response.status_code if 400 <= response.status_code <= 599 else 502)
                return
            now = time.monotonic()
            if now >= deadline:
                return
            if now >= next_keepalive:
                next_keepalive = now + self.config.replay_keepalive_s
                yield KEEPALIVE
            room = self._room
            wait = min(deadline, next_keepalive) - now
            try:
                await asyncio.wait_for(room.wait(), max(0.001, min(wait, 1.0)))
            except asyncio.TimeoutError:
                excluded.clear()

    async def _collect(self, attempt: _Attempt, session: ReplaySession,
                       request: Request) -> Response:
        """A non-streaming client: drive the attempts to the end, answer one completion (or
        the error), hanging up on the head if the client leaves first."""
        async def run() -> None:
            async for _ in self._drive(attempt, session):
                pass

        driving = asyncio.ensure_future(run())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({driving, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not driving.done():
                driving.cancel()
                await asyncio.wait({driving})
            await attempt.close(self)
        if driving.cancelled():
            self.metrics.requests.labels(status="499").inc()
            return Response(status_code=499)
        driving.result()
        if session.final is not None:
            return Response(msgspec.json.encode(session.completion()), status_code=200,
                            media_type=_JSON)
        failure = session.failure or attempt.refused or Failure(PEER_LOST, "the request "
                                                                "failed")
        if attempt.ticket is None and attempt.refused is None and session.failovers:
            failure = Failure(failure.kind, f"the pipeline broke ({failure.message}) and no "
                              "complete pipeline took the request over within "
                              f"{self.config.replay_wait_s:g} s", 503)
        return Response(msgspec.json.encode(error_body(failure.status, failure.message)),
                        status_code=failure.status, media_type=_JSON)


async def _read_quietly(response: httpx.Response) -> bytes:
    try:
        return await response.aread()
    except httpx.HTTPError:
        return b""


class _Attempt:
    """The current attempt of one request: its ticket and the head's response (None while
    being placed again)."""

    def __init__(self, ticket: Ticket, response: httpx.Response) -> None:
        self.ticket: Ticket | None = ticket
        self.response: httpx.Response | None = response
        self.refused: Failure | None = None  # a head answered a replay with an error status

    async def close(self, forwarder: Forwarder) -> None:
        """Give the ticket back and hang up on the head (idempotent)."""
        ticket, response, self.ticket, self.response = self.ticket, self.response, None, None
        if ticket is not None and response is not None:
            await forwarder._close(ticket, response)


class _Relay(StreamingResponse):
    """A StreamingResponse that gives the ticket back even if its body never starts."""

    def __init__(self, content: AsyncIterator[bytes], forwarder: Forwarder, attempt: _Attempt,
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._forwarder, self._attempt = forwarder, attempt

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._attempt.close(self._forwarder)
