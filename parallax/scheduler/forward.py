"""Forwarding a chat request: pick a pipeline (with waits and retries), send it to the head node
with `rid` and `routing_table`, and relay the answer back, continuing it on another pipeline when
its pipeline breaks (replay on failure, parallax/scheduler/replay.py).

The head always streams to the scheduler (the internal leg, parallax/serving/internal_leg.py):
every chunk carries its token ids, every error its kind. The scheduler strips those fields; a
non-streaming client gets the stream assembled into one `chat.completion`. A ticket whose
pipeline loses a node (evicted, left) is cut at once, whatever its head still says, so no
request waits on a pipeline that no longer exists.

Requests waiting for a free pipeline queue in `wait_queue.WaitQueue` (lower `priority` first,
then arrival order); only the first in line looks for room. A `/v1/completions` request goes to
the heads' `/v1/completions` (`Ticket.path`, kept across replays); every head answers the
scheduler in chat chunks, which the app translates for the client (serving/adapters.py).

Decisions stay in the pure modules: :func:`parallax.scheduler.routing.route` picks the pipeline
from :func:`effective_loads`. Load is what heartbeats report plus what the scheduler itself has
in flight: the part of a node's reported load the scheduler did not send (another client, a
stale count) is kept as "external" load, and the scheduler's own count is always current.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from parallax.config import SchedulerConfig
from parallax.p2p.peer import PEER_HEADER
from parallax.protocol.control import RoutingEntry
from parallax.scheduler.affinity import PrefixAffinity
from parallax.scheduler.allocation import Stage
from parallax.scheduler.failover import (
    _JSON,
    FailoverMixin,
    _Attempt,
    _error_message,
    _media_type,
    _Relay,
    _Retryable,
    _wait_disconnect,
)
from parallax.scheduler.registry import Registry
from parallax.scheduler.replay import ReplaySession
from parallax.scheduler.routing import NodeLoad, RouteDecision, conversation_keys, route
from parallax.scheduler.status import ClusterMetrics
from parallax.scheduler.wait_queue import QueueFull, Waiter, WaitQueue
from parallax.serving import sse
from parallax.serving.errors import APIError, error_body
from parallax.serving.internal_leg import request_fields

logger = logging.getLogger("parallax.scheduler")

_MAX_LINE = 1 << 20
CHAT_PATH = "/v1/chat/completions"  # the head's endpoints a request may be forwarded to
COMPLETIONS_PATH = "/v1/completions"


class InFlight:
    """Requests the scheduler has sent and not yet seen finish, per node."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.at_heartbeat: dict[str, int] = {}  # our count when the node's last heartbeat came

    def add(self, node_ids: tuple[str, ...], delta: int) -> None:
        for node_id in node_ids:
            count = self.counts.get(node_id, 0) + delta
            if count > 0:
                self.counts[node_id] = count
            else:
                self.counts.pop(node_id, None)

    def mark_heartbeat(self, node_id: str) -> None:
        self.at_heartbeat[node_id] = self.counts.get(node_id, 0)

    def forget(self, node_id: str) -> None:
        self.at_heartbeat.pop(node_id, None)


def effective_running(registry: Registry, inflight: InFlight) -> dict[str, int]:
    """Per node: our in-flight count + the reported load we did not send (never negative)."""
    out = {}
    for node_id, record in registry.nodes.items():
        reported = record.running_requests + record.waiting_requests
        external = max(0, reported - inflight.at_heartbeat.get(node_id, 0))
        out[node_id] = inflight.counts.get(node_id, 0) + external
    return out


def effective_loads(registry: Registry, inflight: InFlight) -> dict[str, NodeLoad]:
    """NodeLoad of every node serving its assigned layers (others are left out: not routable)."""
    running = effective_running(registry, inflight)
    return {
        node_id: NodeLoad(node_id, running[node_id], 0, record.max_running_requests,
                          record.layer_latency_ms)
        for node_id, record in registry.nodes.items() if registry.is_ready(node_id)
    }


class StreamPeek:
    """Watches SSE bytes go by (never changing them): `[DONE]`, error events, final chunks."""

    def __init__(self) -> None:
        self._partial = b""
        self._skip = False  # inside an over-long line: ignore it
        self.done = False
        self.error: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """Feed bytes; return the chunks that carry `metrics` (normally the final one)."""
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        finals: list[dict[str, Any]] = []
        for line in lines:
            skip, self._skip = self._skip, False
            if skip or not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
            elif b'"metrics"' in payload or b'"error"' in payload:
                try:
                    obj = msgspec.json.decode(payload)
                except msgspec.DecodeError:
                    continue
                if isinstance(obj, dict) and obj.get("object") == "error":
                    self.error = obj
                elif isinstance(obj, dict) and isinstance(obj.get("metrics"), dict):
                    finals.append(obj)
        if len(self._partial) > _MAX_LINE:
            self._partial, self._skip = b"", True
        return finals


@dataclass
class Ticket:
    """One request placed on one pipeline."""

    rid: str
    index: int
    pipeline: tuple[Stage, ...]
    label: str
    released: bool = False
    payload: dict[str, Any] | None = None  # the client's request (for replays)
    path: str = CHAT_PATH  # the head's endpoint it goes to
    broken: asyncio.Event = field(default_factory=asyncio.Event)  # a node of it is gone

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(stage.node_id for stage in self.pipeline)


# connections to head nodes (a transport passed in ignores the client's limits: give it these)
NODE_LIMITS = httpx.Limits(max_connections=4096, max_keepalive_connections=64)

class Forwarder(FailoverMixin):
    """Places requests on pipelines and relays the head node's answer."""

    def __init__(self, registry: Registry, config: SchedulerConfig, metrics: ClusterMetrics,
                 *, on_change: Callable[[], None] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.inflight = InFlight()
        self.waiting = WaitQueue(config.max_queued)  # requests waiting for room, in order
        self._init_failover()
        self._on_change = on_change or (lambda: None)
        self._room = asyncio.Event()
        self._last_index = -1
        self.affinity = PrefixAffinity()  # conversation -> pipeline holding its prefix
        timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s,
                                pool=config.connect_timeout_s)
        self.client = httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False,
                                        limits=NODE_LIMITS,
                                        verify=config.tls.client_verify())  # https nodes

    @property
    def queued(self) -> int:
        """Requests waiting for room."""
        return len(self.waiting)

    async def aclose(self) -> None:
        await self.client.aclose()

    def wake(self) -> None:
        """Wake requests waiting for room (a request ended, a pipeline became ready...), and
        cut the tickets whose pipeline lost a node (evicted, left)."""
        self._room.set()
        self._room = asyncio.Event()
        self._cut_broken()

    # ---- placing ------------------------------------------------------------------------

    def pick(self, excluded: Collection[int] = (),
             conversation: list[str] | None = None) -> RouteDecision:
        """The route decision now, skipping pipeline indices in `excluded`; `conversation`
        (routing.conversation_keys of the request) prefers the pipeline that served its
        history (cache-aware routing)."""
        allocation = self.registry.allocation
        if allocation is None:
            return RouteDecision(None, "no_pipeline")
        pipelines = [() if i in excluded or any(self.is_suspect(s.node_id) for s in p) else p
                     for i, p in enumerate(allocation.pipelines)]
        preferred = self.affinity.preferred(
            conversation or [], [[s.node_id for s in p] for p in allocation.pipelines])
        decision = route(pipelines, effective_loads(self.registry, self.inflight),
                         link_latency_ms=self.registry.link_latency_ms(),
                         last_index=self._last_index, preferred=preferred)
        if decision.pipeline_index is not None:
            self._last_index = decision.pipeline_index
        return decision

    def routing_table(self, pipeline: tuple[Stage, ...]) -> list[dict[str, Any]]:
        """RoutingEntry objects (head first) as JSON-ready dicts."""
        table = []
        for stage in pipeline:
            record = self.registry.nodes[stage.node_id]
            table.append(msgspec.to_builtins(RoutingEntry(
                stage.node_id, record.http_url, record.activation_endpoint, stage.start_layer,
                stage.end_layer)))
        return table

    def _acquire(self, index: int, rid: str, path: str = CHAT_PATH) -> Ticket:
        pipeline = self.registry.allocation.pipelines[index]
        ticket = Ticket(rid, index, pipeline, ">".join(s.node_id for s in pipeline), path=path)
        self.inflight.add(ticket.node_ids, +1)
        self.active[rid] = ticket
        self.metrics.pipeline_requests.labels(pipeline=ticket.label).inc()
        self._on_change()
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Give the request's slots back (idempotent)."""
        if not ticket.released:
            ticket.released = True
            self.inflight.add(ticket.node_ids, -1)
            if self.active.get(ticket.rid) is ticket:
                del self.active[ticket.rid]
            self.wake()
            self._on_change()

    async def open(self, payload: dict[str, Any], rid: str, path: str = CHAT_PATH,
                   priority: int = 0) -> tuple[Ticket, httpx.Response]:
        """Route and send; returns the head's response (status 200 or an error to pass on).

        All busy: join the wait queue (bounded: `max_queued`, then 429) and wait for room (a
        request ending, or `retry_interval_s`) until `retry_attempts × retry_interval_s`
        passed, then 429. Only the first in line (lower `priority` first, equal ones first
        come, first served) tries to place itself. A head that cannot be reached or answers
        429 / 503 costs one of `retry_attempts` and the request tries another pipeline (or
        waits). No ready pipeline: 503 at once.
        """
        attempts, interval = self.config.retry_attempts, self.config.retry_interval_s
        deadline = time.monotonic() + attempts * interval
        failures, excluded = 0, set()
        conversation = conversation_keys(payload.get("messages"))
        last: APIError | None = None
        waiter: Waiter | None = None  # in the wait queue
        try:
            while True:
                turn = self.waiting.first() is waiter  # nobody waits, or this one is first
                decision = self.pick(excluded, conversation) if turn else None
                if decision is not None and decision.pipeline_index is not None:
                    if waiter is not None:
                        waiter = self._leave_queue(waiter)
                    ticket = self._acquire(decision.pipeline_index, rid, path)
                    self.affinity.remember(conversation, ticket.node_ids)
                    try:
                        return ticket, await self._send(ticket, payload)
                    except _Retryable as exc:
                        self.release(ticket)
                        self.metrics.retries.labels(reason=exc.reason).inc()
                        failures, last = failures + 1, exc.error
                        logger.info("request %s: %s; retrying", rid, exc.error.message)
                        if failures > attempts:
                            raise exc.error from None
                        excluded.add(decision.pipeline_index)
                        continue
                    except BaseException:
                        self.release(ticket)
                        raise
                if not self.registry.ready_pipelines():
                    raise last or APIError(503, self._unavailable_message())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise last or APIError(
                        429, f"every pipeline is busy; gave up after {attempts} retries "
                             f"{interval:g} s apart")
                if waiter is None:
                    try:
                        waiter = self.waiting.push(priority)
                    except QueueFull:
                        raise APIError(429, f"every pipeline is busy and "
                                            f"{self.config.max_queued} requests already wait; "
                                            "retry later") from None
                    self._on_change()
                    continue  # look again: it may be first in line now
                self.metrics.retries.labels(reason="all_busy").inc()
                room = self._room
                try:
                    await asyncio.wait_for(room.wait(), min(interval, remaining) or 0.001)
                except asyncio.TimeoutError:
                    excluded.clear()
        finally:
            if waiter is not None:
                self._leave_queue(waiter)

    def _leave_queue(self, waiter: Waiter) -> None:
        """Out of the wait queue; the next in line looks for room at once."""
        self.waiting.remove(waiter)
        self.wake()
        self._on_change()

    async def place(self, payload: dict[str, Any], rid: str, request: Request,
                    path: str = CHAT_PATH,
                    priority: int = 0) -> tuple[Ticket, httpx.Response] | None:
        """:meth:`open`, abandoned (None) as soon as the client goes away.

        A non-streaming answer sends no byte before the whole completion is ready, so without
        this a client that gives up would leave the head generating (and its slots taken).
        """
        # the head always streams to us, with the internal fields (internal_leg.py)
        internal = {**payload, "stream": True, **request_fields([])}
        opening = asyncio.ensure_future(self.open(internal, rid, path, priority))
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({opening, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not opening.done():
                opening.cancel()
                await asyncio.wait({opening})  # let it give its slots back and hang up
        if opening.cancelled():
            self.metrics.requests.labels(status="499").inc()
            return None
        ticket, response = opening.result()
        ticket.payload = payload
        return ticket, response

    def _unavailable_message(self) -> str:
        registry = self.registry
        if registry.model is None:
            return "no model is selected yet; choose one with POST /scheduler/init"
        if registry.allocation is None or registry.allocation.need_more_nodes:
            reason = registry.allocation.reason if registry.allocation else (
                f"{len(registry.nodes)} of {registry.init_nodes_num} nodes joined")
            return f"no complete pipeline: {reason}; join more nodes"
        return "no pipeline is ready yet: nodes are loading their layers; retry shortly"

    async def _send(self, ticket: Ticket, payload: dict[str, Any]) -> httpx.Response:
        head = self.registry.nodes[ticket.pipeline[0].node_id]
        url = head.http_url.rstrip("/") + ticket.path
        body = {**payload, "rid": ticket.rid, "routing_table": self.routing_table(ticket.pipeline)}
        headers = {"content-type": "application/json"}
        if self.config.join_token:  # nodes of a cluster with a token serve only their scheduler
            headers["x-join-token"] = self.config.join_token
        if head.peer_id:  # P2P mode: the transport carries it over Lattica to this peer
            headers[PEER_HEADER] = head.peer_id
        request = self.client.build_request("POST", url, content=msgspec.json.encode(body),
                                            headers=headers)
        where = f"head node {head.node_id} ({head.peer_id or url})"
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _Retryable(APIError(503, f"{where} is unreachable: {exc!r}"), "connect") from None
        except httpx.TimeoutException:
            raise APIError(503, f"{where} did not answer within "
                                f"{self.config.read_timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise _Retryable(APIError(503, f"{where} failed: {exc!r}"), "connect") from None
        if response.status_code in (429, 503):
            try:
                text = await response.aread()
            except httpx.HTTPError:
                text = b""
            finally:
                await response.aclose()
            reason = "busy" if response.status_code == 429 else "unavailable"
            message = _error_message(text, f"{where} answered {response.status_code}")
            raise _Retryable(APIError(response.status_code, message), reason)
        return response

    # ---- relaying -----------------------------------------------------------------------

    async def _close(self, ticket: Ticket, response: httpx.Response) -> None:
        self.release(ticket)
        with anyio.CancelScope(shield=True):
            try:
                await response.aclose()
            except Exception:  # closing a broken connection may fail; it is gone either way
                pass

    async def respond(self, ticket: Ticket, response: httpx.Response, *, stream: bool,
                      request: Request) -> Response:
        """The client's response: the replaying SSE relay, the assembled completion of a
        non-streaming request, or the head's whole body (an error before any stream)."""
        if response.status_code == 200 and _media_type(response) == sse.MEDIA_TYPE:
            attempt = _Attempt(ticket, response)
            session = ReplaySession(ticket.rid, ticket.payload or {}, collect=not stream,
                                    path=ticket.path)
            if stream:
                return _Relay(self._drive(attempt, session), self, attempt,
                              media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
            return await self._collect(attempt, session, request)
        try:
            return await self._whole(ticket, response, request)
        finally:
            await self._close(ticket, response)

    async def _whole(self, ticket: Ticket, response: httpx.Response,
                     request: Request) -> Response:
        """Read the head's whole answer, abandoning it (closing upstream) if the client leaves."""
        read = asyncio.ensure_future(response.aread())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({read, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (read, gone):
                task.cancel()
        if not read.done() or read.cancelled():
            self.metrics.requests.labels(status="499").inc()
            return Response(status_code=499)
        try:
            body = read.result()
        except httpx.HTTPError as exc:
            self.metrics.requests.labels(status="503").inc()
            error = error_body(503, f"the head node {ticket.pipeline[0].node_id} failed: {exc!r}")
            return Response(msgspec.json.encode(error), status_code=503,
                            media_type="application/json")
        checked = _checked_body(response, body, ticket.pipeline[0].node_id)
        self.metrics.requests.labels(status=str(checked.status_code)).inc()
        if checked.status_code == 200 and checked.media_type == _JSON:
            try:
                self.metrics.observe_final(ticket.label, msgspec.json.decode(body))
            except (msgspec.DecodeError, AttributeError):
                pass
        return checked


def _checked_body(response: httpx.Response, body: bytes, head_id: str) -> Response:
    """The head's answer as ours: only a JSON body (or an SSE one, when 200) passes, under our
    own content type; anything else becomes our error body (a head cannot make the scheduler
    serve HTML or a script)."""
    status, media = response.status_code, _media_type(response)
    if media == sse.MEDIA_TYPE and status == 200:
        return Response(body, status_code=200, media_type=sse.MEDIA_TYPE)
    if media == _JSON:
        try:
            msgspec.json.decode(body)
            return Response(body, status_code=status, media_type=_JSON)
        except msgspec.DecodeError:
            pass
    status = status if status >= 400 else 502
    error = error_body(status, f"the head node {head_id} answered HTTP {response.status_code} "
                               f"with a {media or 'untyped'} body, not JSON")
    return Response(msgspec.json.encode(error), status_code=status, media_type=_JSON)


