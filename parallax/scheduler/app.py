"""The scheduler's HTTP app: OpenAI API in front, node control plane behind, status on the side.

Thin on purpose: allocation, routing and the status object live in pure modules; forwarding in
`forward.py`. `SchedulerState` holds the registry and everything the endpoints share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from parallax.config import MAX_INIT_NODES, QUANTIZE_CHOICES, SchedulerConfig
from parallax.net import is_loopback_host, lan_address
from parallax.node.link_crypto import is_curve_key
from parallax.protocol.common import DownloadProgress
from parallax.protocol.control import (
    Assignment,
    Heartbeat,
    HeartbeatResponse,
    JoinResponse,
    NodeJoin,
    NodeLeave,
    PeerEndpoint,
    ProbeTarget,
)
from parallax.scheduler.admission import AdvertiseAllowList, advertise_refusal
from parallax.scheduler.allocation import NodeInfo
from parallax.scheduler.catalog import ModelCatalog, canonical_model, display_name
from parallax.scheduler.forward import CHAT_PATH, COMPLETIONS_PATH, Forwarder, effective_running
from parallax.scheduler.link_keys import LinkKeys
from parallax.scheduler.network import MAX_PROBE_PEERS
from parallax.scheduler.registry import NodeRecord, Registry
from parallax.scheduler.status import (
    ClusterMetrics,
    StatusHub,
    cluster_status,
    join_command,
    status_events,
    with_join_token,
)
from parallax.serving import sse
from parallax.serving.adapters import OutputAdapter, adapt_response
from parallax.serving.completions import completion_adapter, parse_completion_request
from parallax.serving.errors import (
    APIError,
    check_secret,
    install_error_handlers,
    require_join_token,
)
from parallax.serving.openai_schemas import (
    ChatCompletionRequest,
    check_model_name,
    models_list,
    new_chat_id,
    parse_chat_request,
    parse_json_body,
)
from parallax.serving.responses_api import responses_adapter, responses_to_chat
from parallax.serving.security import (
    CONTROL_BODY_LIMIT,
    RELAYED_HEADER,
    install_security,
    is_host_port_url,
    is_operator,
    is_relayed,
    read_body_capped,
    require_api_key,
    require_json,
    require_operator,
)
from parallax.web import mount_web_ui

logger = logging.getLogger("parallax.scheduler")

_JSON = msgspec.json.Encoder()
_NODE_ID = re.compile(r"^[\w.:@-]{1,128}$")
NODE_SECRET_HEADER = "x-node-secret"


def _download_view(download: DownloadProgress | None) -> dict[str, float] | None:
    """A node's hub download for the cluster view, or None when absent or nonsensical."""
    if download is None:
        return None
    numbers = (download.done_bytes, download.total_bytes, download.bytes_per_s, download.eta_s)
    if not all(0 <= n < 2**62 for n in numbers) or download.done_bytes > download.total_bytes:
        return None
    return {"done_bytes": download.done_bytes, "total_bytes": download.total_bytes,
            "bytes_per_s": round(download.bytes_per_s), "eta_s": round(download.eta_s, 1)}


def _msgspec_response(obj: Any) -> Response:
    return Response(_JSON.encode(obj), media_type="application/json")


class SchedulerState:
    """Everything the endpoints share; one per app."""

    def __init__(self, config: SchedulerConfig, *, catalog: ModelCatalog | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.registry = Registry(heartbeat_timeout_s=config.heartbeat_timeout_s,
                                 init_nodes_num=config.init_nodes_num)
        local = [*config.local_models]
        if (config.model and config.model.endswith(".gguf")) or _is_dir(config.model):
            local.insert(0, config.model)
        self.catalog = catalog or ModelCatalog(config.dtype, local_models=local,
                                               quantize=config.quantize)
        self.hub = StatusHub()
        self.metrics = ClusterMetrics()
        self.link_keys = LinkKeys()  # stage-link keys, handed out in heartbeat answers
        self.forwarder = Forwarder(self.registry, config, self.metrics,
                                   on_change=self.changed, transport=transport)
        self.forwarder.on_unreachable = self.evict_unreachable
        self.node_states: dict[str, str] = {}  # last heartbeat `state` per node
        self.is_local_network = True
        self.join_command = join_command(config.host, config.port,
                                         config.tls.serves_tls)  # without the token
        self.node_secrets: dict[str, str] = {}  # issued at join, sent back as X-Node-Secret
        self.advertise_allowed = AdvertiseAllowList.parse(config.allow_advertised_hosts)
        self.own_addresses = (lan_address(),)  # a node beside us may advertise it (admission)
        self._model_list: list[dict[str, Any]] | None = None
        self._model_list_lock = asyncio.Lock()

    def changed(self) -> None:
        """Something the status shows changed: wake status streams and waiting requests."""
        self.hub.notify()
        self.forwarder.wake()

    # ---- model ----------------------------------------------------------------------------

    @property
    def model_name(self) -> str | None:
        return None if self.registry.model is None else self.registry.model.name

    @property
    def quantize(self) -> str | None:
        """The served model's --quantize (None: float weights, or a GGUF packed as stored)."""
        return None if self.registry.model is None else self.registry.model.quantize

    def set_model(self, model: str | None, init_nodes_num: int | None = None,
                  quantize: str | None = None) -> None:
        """Size `model` loaded with `quantize` (blocking; ValueError if unknown, or `quantize`
        with a GGUF) and allocate it afresh."""
        spec = self.catalog.spec(model, quantize)
        if init_nodes_num is not None:
            self.registry.init_nodes_num = init_nodes_num
        self.registry.set_model(spec)
        logger.info("model %s%s: %d layers; %s", spec.name,
                    f" (quantized to {quantize})" if quantize else "", spec.num_layers,
                    self.registry.allocation.reason if self.registry.allocation else "waiting")
        self.changed()

    async def model_list(self) -> list[dict[str, Any]]:
        async with self._model_list_lock:
            if self._model_list is None:
                self._model_list = await asyncio.to_thread(self.catalog.entries)
            entries = list(self._model_list)
        current = self.registry.model
        if current is not None:  # as served (its quantize): replaces one sized otherwise
            served = self.catalog.entry(current)
            names = [e["name"] for e in entries]
            if current.name in names:
                entries[names.index(current.name)] = served
            else:
                entries.insert(0, served)
        return entries

    def check_model(self, requested: str | None) -> None:
        """404 unless `requested` is absent, "default", or names the served model."""
        served = self.model_name
        if served is None:
            raise APIError(503, "no model is selected yet; choose one with POST /scheduler/init")
        if requested and self.catalog.known_as(requested) == served:
            return  # e.g. the `OWNER/REPO:QUANT` the model was chosen by, for its pinned name
        try:
            check_model_name(requested, served)
        except APIError:
            check_model_name(requested, display_name(served))

    # ---- nodes ----------------------------------------------------------------------------

    def assignment_of(self, node_id: str) -> Assignment | None:
        layers = self.registry.assignment(node_id)
        if layers is None or self.registry.model is None:
            return None
        return Assignment(self.registry.model.name, layers[0], layers[1], self.registry.generation,
                          quantize=self.registry.model.quantize)

    def node_join_command(self, *, reveal: bool) -> str:
        """The join command: with the real token only when `reveal` (an operator asks)."""
        return with_join_token(self.join_command, self.config.join_token, reveal=reveal)

    def check_node_secret(self, node_id: str, given: str | None) -> None:
        """403 unless `given` is the secret `node_id` received at its join. A node unknown
        here passes: its heartbeat is answered `known: false` (join again), its leave a no-op."""
        expected = self.node_secrets.get(node_id)
        if expected is not None and not check_secret(given, expected):
            raise APIError(403, f"wrong or missing node secret for {node_id}: a node speaks "
                                "only for itself, with the X-Node-Secret its join answer gave it")

    def check_rejoin(self, node_id: str, given: str | None) -> None:
        """A node id whose entry is alive may join again only with that entry's secret (else
        409): a token holder cannot take over another node. A restarted node that lost its
        secret joins again once its old entry is evicted (no heartbeat for the timeout)."""
        expected = self.node_secrets.get(node_id)
        if node_id in self.registry.nodes and expected is not None \
                and not check_secret(given, expected):
            raise APIError(409, f"node {node_id} is already joined and alive; a restarted node "
                                f"is let in again once its old entry is evicted (after "
                                f"{self.config.heartbeat_timeout_s:g} s without heartbeats); "
                                "two nodes must not share a node id (use another --port)")

    def check_advertised(self, message: NodeJoin, request: Request) -> None:
        """403 unless the node may advertise the hosts of its http_url and activation endpoint
        (scheduler/admission.py): the address its join comes from, or one the operator
        allowed. A P2P node's join relayed by our bridge is let through: the scheduler reaches
        it by peer id, and Lattica does not say which address the call came from. Any other
        relayed join came from our proxy's address, not the node's: only the list admits it."""
        peer = request.client.host if request.client is not None else None
        if is_relayed(request):
            if message.peer_id is not None and _bridged_by_p2p(request):
                return
            peer = None
        for url in (message.http_url, message.activation_endpoint):
            refusal = advertise_refusal(message.node_id, urlsplit(url).hostname or "", peer,
                                        self.advertise_allowed, self.own_addresses)
            if refusal is not None:
                logger.warning("join refused: %s", refusal)
                raise APIError(403, refusal)

    def join(self, message: NodeJoin) -> JoinResponse:
        now = self.clock()
        previous = self.registry.nodes.get(message.node_id)
        joined_at = previous.joined_at if previous is not None else now
        info = NodeInfo(message.node_id, message.memory_bytes, message.gflops,
                        message.bandwidth_gbps, joined_at)
        record = NodeRecord(message.node_id, info, message.device, message.device_name,
                            message.http_url.rstrip("/"), message.activation_endpoint,
                            joined_at=joined_at, last_seen=now,
                            max_running_requests=message.max_running_requests,
                            peer_id=message.peer_id)
        self.registry.join(record)
        secret = self.node_secrets[message.node_id] = secrets.token_urlsafe(32)
        self.node_states[message.node_id] = "joined"
        self.forwarder.inflight.forget(message.node_id)
        logger.info("node %s joined%s (%s, %.2f GiB, %.0f GFLOP/s) -> %s", message.node_id,
                    " again" if previous else "", message.device_name,
                    message.memory_bytes / 2**30, message.gflops,
                    self.registry.assignment(message.node_id))
        self.changed()
        return JoinResponse(message.node_id, self.config.heartbeat_interval_s,
                            self.assignment_of(message.node_id), node_secret=secret)

    def heartbeat(self, message: Heartbeat) -> HeartbeatResponse:
        record = self.registry.nodes.get(message.node_id)
        if record is not None:  # before the grant, which hands it to the pipeline's peers
            record.curve_public_key = message.curve_public_key \
                if is_curve_key(message.curve_public_key) else ""
        grant = self.link_keys.grant(self.registry, message.node_id)
        # loaded = serving with its pipeline's current link key (else its peers' messages drop)
        loaded = message.state not in ("loading", "error") and grant.held_by(message.link_key_id)
        loaded_range = None
        if loaded and message.loaded_start_layer is not None \
                and message.loaded_end_layer is not None:
            loaded_range = (message.loaded_start_layer, message.loaded_end_layer)
        known = self.registry.heartbeat(
            message.node_id, self.clock(), running_requests=message.running_requests,
            waiting_requests=message.waiting_requests, free_blocks=message.free_blocks,
            total_blocks=message.total_blocks, layer_latency_ms=message.layer_latency_ms,
            loaded_model=message.loaded_model if loaded else None,
            loaded_quantize=message.loaded_quantize if loaded else None, loaded_range=loaded_range,
            download=_download_view(message.download))
        if not known:
            return HeartbeatResponse(known=False)
        self._take_links(message)
        self.forwarder.inflight.mark_heartbeat(message.node_id)
        if message.state == "error" and self.node_states.get(message.node_id) != "error":
            logger.warning("node %s reports an error: %s", message.node_id, message.error)
        self.node_states[message.node_id] = message.state
        self.changed()
        return HeartbeatResponse(known=True, assignment=self.assignment_of(message.node_id),
                                 peers=self.p2p_peers(message.node_id), link_key=grant.key,
                                 link_peers=grant.peers, link_curve_keys=grant.curve_keys,
                                 probe_peers=self.probe_peers(message.node_id))

    def _take_links(self, message: Heartbeat) -> None:
        """Validated network measurements into the latency matrix (bad ones: logged, dropped)."""
        if len(message.links) > MAX_PROBE_PEERS:
            logger.warning("node %s reported %d links (at most %d): ignored", message.node_id,
                           len(message.links), MAX_PROBE_PEERS)
            return
        links = [(r.node_id, r.rtt_ms, r.bandwidth_mbps) for r in message.links]
        taken = self.registry.report_links(message.node_id, links, self.clock(),
                                           message.scheduler_rtt_ms)
        if taken < len(links):
            logger.info("node %s: %d of %d link reports invalid or unknown peers, dropped",
                        message.node_id, len(links) - taken, len(links))

    def probe_peers(self, node_id: str) -> list[ProbeTarget]:
        """Peers a directly joined node should measure (P2P nodes are not reachable by URL)."""
        if self.registry.nodes[node_id].peer_id is not None:
            return []
        return [ProbeTarget(peer, self.registry.nodes[peer].http_url)
                for peer in self.registry.probe_peers(node_id)
                if self.registry.nodes[peer].peer_id is None]

    def p2p_peers(self, node_id: str) -> list[PeerEndpoint]:
        """The other nodes that joined over P2P (empty for a node that did not)."""
        if self.registry.nodes[node_id].peer_id is None:
            return []
        return [PeerEndpoint(r.activation_endpoint, r.peer_id, self.registry.is_ready(other))
                for other, r in self.registry.nodes.items()
                if other != node_id and r.peer_id is not None]

    def leave(self, node_id: str) -> bool:
        left = self.registry.leave(node_id)
        self._forget(node_id)
        if left:
            logger.info("node %s left", node_id)
            self.changed()
        return left

    def evict_silent(self) -> list[str]:
        evicted = self.registry.evict_silent(self.clock())
        for node_id in evicted:
            logger.warning("node %s evicted: no heartbeat for %.0f s", node_id,
                           self.config.heartbeat_timeout_s)
            self._forget(node_id)
        if evicted:
            self.changed()
        return evicted

    def evict_unreachable(self, node_id: str) -> None:
        """A failure named this node and its HTTP port refuses connections: evict it now."""
        if self.registry.leave(node_id):
            logger.warning("node %s evicted: a pipeline failure named it and it refuses "
                           "connections", node_id)
            self._forget(node_id)
            self.changed()

    def _forget(self, node_id: str) -> None:
        self.node_states.pop(node_id, None)
        self.node_secrets.pop(node_id, None)
        self.forwarder.inflight.forget(node_id)
        self.forwarder.traces.forget_node(node_id)

    # ---- views ----------------------------------------------------------------------------

    def status(self, *, reveal: bool = False) -> dict[str, Any]:
        """The status object; its join command holds the real token only when `reveal`."""
        return cluster_status(self.registry,
                              node_join_command=self.node_join_command(reveal=reveal),
                              running=effective_running(self.registry, self.forwarder.inflight),
                              reported_states=self.node_states,
                              stage_ms=self.forwarder.traces.stage_ms)

    def render_metrics(self) -> tuple[bytes, str]:
        running = effective_running(self.registry, self.forwarder.inflight)
        ready = {n: self.registry.is_ready(n) for n in self.registry.nodes}
        self.metrics.set_nodes(running, ready, len(self.registry.ready_pipelines()),
                               self.forwarder.queued)
        return self.metrics.render()

    async def evict_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.evict_interval_s)
            try:
                self.evict_silent()
            except Exception:  # never let the sweeper die
                logger.exception("evicting silent nodes failed")


_DEFAULT = object()  # /scheduler/init without 'quantize'


def _is_dir(model: str | None) -> bool:
    import os

    return bool(model) and os.path.isdir(os.path.expanduser(model))


def _valid_join(message: NodeJoin) -> None:
    """400 unless the join's id and addresses are plain: `scheme://host:port`, nothing more
    (a path, query or userinfo would let a node steer the scheduler's requests)."""
    if not _NODE_ID.match(message.node_id):
        raise APIError(400, "node_id must be 1-128 letters, digits or . _ : @ -")
    if not is_host_port_url(message.http_url, ("http", "https")):
        raise APIError(400, f"http_url must be http(s)://host:port with no path or query, "
                            f"got {message.http_url!r}")
    if not is_host_port_url(message.activation_endpoint, ("tcp",)):
        raise APIError(400, f"activation_endpoint must be tcp://host:port, "
                            f"got {message.activation_endpoint!r}")
    if message.memory_bytes < 0 or message.max_running_requests < 1:
        raise APIError(400, "memory_bytes must be >= 0 and max_running_requests >= 1")


def _bridged_by_p2p(request: Request) -> bool:
    """Relayed by this scheduler's P2P bridge (parallax/p2p/bridge.py marks "p2p" and calls
    from loopback; a remote caller cannot make its connection come from loopback)."""
    client = request.client
    return client is not None and is_loopback_host(client.host) \
        and request.headers.get(RELAYED_HEADER) == "p2p"


def _decode(body: bytes, type_: type) -> Any:
    try:
        return msgspec.json.decode(body, type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise APIError(400, f"bad {type_.__name__} body: {exc}") from None


def build_app(state: SchedulerState) -> FastAPI:
    """The FastAPI app of `parallax run` around `state`."""
    config = state.config

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(state.evict_loop())
        warm = asyncio.create_task(state.model_list())  # size the setup page's models early
        try:
            yield
        finally:
            for task in (sweeper, warm):
                task.cancel()
            await state.forwarder.aclose()

    app = FastAPI(title="Parallax scheduler", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.scheduler = state
    install_error_handlers(app)

    async def control_body(request: Request, type_: type) -> Any:
        require_join_token(request, config.join_token)
        return _decode(await read_body_capped(request, CONTROL_BODY_LIMIT), type_)

    # ---- OpenAI API -------------------------------------------------------------------------

    async def serve(request: Request, parse: Callable[[Any], ChatCompletionRequest],
                    path: str = CHAT_PATH,
                    adapter: Callable[[Any, Any], OutputAdapter] | None = None,
                    to_chat: Callable[[Any], Any] | None = None) -> Response:
        """Validate, place on a pipeline, relay (with replay on failure). `path`: the head's
        endpoint; `to_chat` translates the body into a chat body first, `adapter` the chat
        answer into the client's API."""
        require_api_key(request, config.api_key)
        raw = parse_json_body(await read_body_capped(request, config.max_body_bytes))
        body = raw if to_chat is None else to_chat(raw)
        req = parse(body)  # 400 on a malformed request, before routing
        state.check_model(req.model)
        # the head gets what was validated here, normalized (it parses and checks it again)
        payload = req.to_body()
        # always our own id: a client-chosen one could collide with (and abort) another's
        rid = new_chat_id()
        try:
            placed = await state.forwarder.place(payload, rid, request, path=path,
                                                 priority=req.priority)
        except APIError as exc:
            state.metrics.requests.labels(status=str(exc.status)).inc()
            raise
        if placed is None:  # the client went away first
            return Response(status_code=499)
        ticket, response = placed
        answer = await state.forwarder.respond(ticket, response, stream=req.stream,
                                               request=request)
        return answer if adapter is None else adapt_response(answer, adapter(req, raw))

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request) -> Response:
        return await serve(request, parse_chat_request)

    @app.post(COMPLETIONS_PATH)
    async def completions(request: Request) -> Response:
        return await serve(request, parse_completion_request, COMPLETIONS_PATH,
                           completion_adapter)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await serve(request, parse_chat_request, CHAT_PATH, responses_adapter,
                           responses_to_chat)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        require_api_key(request, config.api_key)
        if state.model_name is None:
            return {"object": "list", "data": []}
        return models_list(display_name(state.model_name))

    # ---- status and setup -------------------------------------------------------------------

    # public, but the join token in them only for the operator

    @app.get("/cluster/status")
    async def cluster_status_stream(request: Request) -> StreamingResponse:
        reveal = is_operator(request, config.api_key)
        return StreamingResponse(status_events(state.hub, lambda: state.status(reveal=reveal)),
                                 media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    @app.get("/cluster/status_json")
    async def cluster_status_json(request: Request) -> dict[str, Any]:
        return state.status(reveal=is_operator(request, config.api_key))

    @app.get("/model/list")
    async def model_list() -> dict[str, Any]:
        return {"type": "model_list", "data": await state.model_list()}

    @app.get("/node/join/command")
    async def node_join_command(request: Request) -> dict[str, Any]:
        command = state.node_join_command(reveal=is_operator(request, config.api_key))
        return {"type": "node_join_command", "data": {"command": command}}

    @app.post("/scheduler/init")
    async def scheduler_init(request: Request) -> dict[str, Any]:
        require_operator(request, config.api_key, "choosing the model (POST /scheduler/init)")
        require_json(request)
        body = parse_json_body(await read_body_capped(request, CONTROL_BODY_LIMIT))
        if not isinstance(body, dict):
            raise APIError(400, "expected a JSON object {model_name, init_nodes_num, "
                                "is_local_network, quantize}")
        model = body.get("model_name")
        quantize = body.get("quantize", _DEFAULT)
        if quantize is not _DEFAULT and quantize is not None \
                and quantize not in QUANTIZE_CHOICES:
            raise APIError(400, f"'quantize' must be one of {', '.join(QUANTIZE_CHOICES)} or "
                                f"null (float weights), got {quantize!r}")
        nodes = body.get("init_nodes_num", state.registry.init_nodes_num)
        local = body.get("is_local_network", state.is_local_network)
        if model is not None and not isinstance(model, str):
            raise APIError(400, f"'model_name' must be a string, got {model!r}")
        if not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= \
                MAX_INIT_NODES:
            raise APIError(400, f"'init_nodes_num' must be a whole number from 1 to "
                                f"{MAX_INIT_NODES}, got {nodes!r}")
        if not isinstance(local, bool):
            raise APIError(400, f"'is_local_network' must be true or false, got {local!r}")
        name = canonical_model(model)
        if quantize is _DEFAULT:  # absent: the scheduler's --quantize (float checkpoints only)
            try:
                quantize = state.catalog.default_quantize(name)
            except ValueError as exc:
                raise APIError(400, str(exc)) from None
        if name != state.model_name or nodes != state.registry.init_nodes_num \
                or quantize != state.quantize:
            try:
                await asyncio.wait_for(asyncio.to_thread(state.catalog.spec, name, quantize), 60)
            except asyncio.TimeoutError:
                raise APIError(503, f"sizing {name} took too long; retry") from None
            except (ValueError, OSError) as exc:
                raise APIError(400, str(exc)) from None
            state.set_model(name, nodes, quantize)  # cached: instant
        state.is_local_network = local
        return {"type": "scheduler_init",
                "data": {"model_name": state.model_name, "quantize": state.quantize,
                         "init_nodes_num": nodes,
                         "is_local_network": local, "status": state.registry.status()}}

    @app.get("/v1/traces/{request_id}")
    async def trace(request: Request, request_id: str) -> dict[str, Any]:
        """Every attempt of a recent request: stages, layers, queue/compute, hops (operator)."""
        require_operator(request, config.api_key, "reading request traces")
        found = state.forwarder.traces.get(request_id)
        if found is None:
            raise APIError(404, f"no trace of request {request_id[:80]!r}: the scheduler keeps "
                                f"the latest {state.forwarder.traces.capacity} requests' traces")
        return found

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = state.render_metrics()
        return Response(content, media_type=content_type)

    # ---- node control plane -----------------------------------------------------------------

    @app.post("/node/join")
    async def node_join(request: Request) -> Response:
        message = await control_body(request, NodeJoin)
        _valid_join(message)
        if config.tls.serves_tls and message.peer_id is None \
                and not message.http_url.startswith("https://"):
            raise APIError(400, "this scheduler uses TLS: start the node with --tls-certfile, "
                                "--tls-keyfile and --tls-ca-file, so its API and activation "
                                "links are encrypted too")
        state.check_rejoin(message.node_id, request.headers.get(NODE_SECRET_HEADER))
        state.check_advertised(message, request)
        return _msgspec_response(state.join(message))

    @app.post("/node/heartbeat")
    async def node_heartbeat(request: Request) -> Response:
        message = await control_body(request, Heartbeat)
        state.check_node_secret(message.node_id, request.headers.get(NODE_SECRET_HEADER))
        return _msgspec_response(state.heartbeat(message))

    @app.post("/node/leave")
    async def node_leave(request: Request) -> JSONResponse:
        message = await control_body(request, NodeLeave)
        state.check_node_secret(message.node_id, request.headers.get(NODE_SECRET_HEADER))
        return JSONResponse({"ok": True, "known": state.leave(message.node_id)})

    mount_web_ui(app)  # the setup / join / chat pages at /
    install_security(app, config.host, config.allowed_hosts)
    return app
