"""The node's control-plane agent: join the scheduler, heartbeat, load what it assigns, leave.

Runs inside the frontend process. The scheduler never calls nodes: every change of assignment
arrives in a heartbeat response, so a node behind NAT or a firewall only needs outbound HTTP to
the scheduler (and its activation port reachable by its pipeline neighbours).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import httpx
import msgspec

from parallax.config import ExecutorConfig, JoinConfig, node_executor_config
from parallax.node.executor_client import ExecutorClient, NotReadyError
from parallax.node.http_server import NodeHttpServer
from parallax.node.probe import PROBE_TIMEOUT_S, LinkHistory, measure_peers
from parallax.protocol.control import (
    Assignment,
    Heartbeat,
    HeartbeatResponse,
    JoinResponse,
    LinkReport,
    NodeJoin,
    NodeLeave,
    PeerEndpoint,
    ProbeTarget,
)

logger = logging.getLogger("parallax.agent")

REQUEST_TIMEOUT_S = 10.0
LEAVE_TIMEOUT_S = 3.0
RETRY_S = 2.0


class JoinRejected(Exception):
    """The scheduler refused this node (wrong join token): retrying cannot help."""


def shard_weight_bytes(model: str, start: int, end: int, dtype_bytes: int,
                       quantize: str | None = None) -> int:
    """Estimated bytes of the weights of layers [start, end) (+ embedding / LM head)."""
    from parallax.models.hub import resolve
    from parallax.models.loader import header_source, load_config
    from parallax.models.sizing import shard_bytes

    source = header_source(resolve(model))  # a hub GGUF: its header only
    if source.kind == "repo":
        return 0  # unknown until downloaded; the KV budget falls back to the default
    # a GGUF counts its packed bytes, layer by layer, from the file's tensor table
    return shard_bytes(source, load_config(source), start, end, dtype_bytes, quantize)


class NodeAgent:
    def __init__(self, config: JoinConfig, client: ExecutorClient, frontend: NodeHttpServer,
                 join: NodeJoin, scheduler_url: str, activation_bind: str,
                 say: Callable[[str], None],
                 transport: httpx.AsyncBaseTransport | None = None, links=None,
                 scheduler_label: str | None = None) -> None:
        self.config = config
        self.client = client
        self.frontend = frontend
        self.join_message = join
        self.scheduler_url = scheduler_url
        self.scheduler_label = scheduler_label or scheduler_url  # how messages name it
        self.activation_bind = activation_bind
        self.say = say
        self.assignment: Assignment | None = None
        self.heartbeat_interval_s = 2.0
        self.node_secret = ""  # from the join answer; sent as X-Node-Secret
        # P2P mode passes a LatticaTransport: the same calls then travel to the scheduler's peer
        self.http = httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, transport=transport,
                                      verify=config.tls.client_verify())
        self._ready_task: asyncio.Task | None = None
        self._apply_task: asyncio.Task | None = None
        self._latest_assignment: Assignment | None = None
        self.links = links  # P2P mode: p2p.relay.RelayedLinks, which peers need a relay
        # set when the scheduler should hear from this node before the next interval: it
        # became ready, or took a new link key (the cluster waits on both to route again)
        self._beat_now = asyncio.Event()
        # network measurements (issue 16): heartbeat round trips and the listed peers' links
        self._beat_rtts_ms: deque[float] = deque(maxlen=5)
        self._probe_targets: list[ProbeTarget] = []
        self._link_reports: list[LinkReport] = []
        self._link_history = LinkHistory()
        self._probe_task: asyncio.Task | None = None
        self._peer_http = httpx.AsyncClient(timeout=PROBE_TIMEOUT_S,
                                            verify=config.tls.client_verify())

    @property
    def headers(self) -> dict[str, str]:
        """The cluster's join token and, once joined, this node's own secret."""
        headers = {"X-Join-Token": self.config.join_token} if self.config.join_token else {}
        if self.node_secret:
            headers["X-Node-Secret"] = self.node_secret
        return headers

    async def _post(self, path: str, message: msgspec.Struct, response_type,
                    timeout_s: float = REQUEST_TIMEOUT_S):
        response = await self.http.post(f"{self.scheduler_url}{path}",
                                        content=msgspec.json.encode(message),
                                        headers={**self.headers,
                                                 "Content-Type": "application/json"},
                                        timeout=timeout_s)
        if response.status_code == 401:
            raise JoinRejected(f"the scheduler refused this node: {response.text}")
        response.raise_for_status()
        return msgspec.json.decode(response.content, type=response_type)

    # ---- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Join, then heartbeat forever (rejoining when the scheduler forgot this node)."""
        while True:
            await self._join()
            while await self._heartbeat():
                await self._until_next_beat()
            self.say("the scheduler forgot this node; joining again")

    async def _until_next_beat(self) -> None:
        try:
            await asyncio.wait_for(self._beat_now.wait(), self.heartbeat_interval_s)
        except asyncio.TimeoutError:
            pass
        self._beat_now.clear()

    async def _join(self) -> None:
        waiting_said = False
        while True:
            try:
                answer = await self._post("/node/join", self.join_message, JoinResponse)
                break
            except (httpx.HTTPError, msgspec.DecodeError) as exc:
                if not waiting_said:
                    self.say(f"waiting for the scheduler {self.scheduler_label} ({exc})")
                    waiting_said = True
                await asyncio.sleep(RETRY_S)
        self.heartbeat_interval_s = answer.heartbeat_interval_s
        self.node_secret = answer.node_secret  # proves this node's identity from now on
        self.say(f"joined {self.scheduler_label} as {answer.node_id}")
        self._apply_soon(answer.assignment)

    async def _heartbeat(self) -> bool:
        """One heartbeat; False when the node must join again."""
        try:
            start = time.perf_counter()
            answer = await self._post("/node/heartbeat", self.heartbeat(),
                                      HeartbeatResponse)
            self._beat_rtts_ms.append((time.perf_counter() - start) * 1e3)
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            logger.warning("heartbeat failed: %s", exc)
            return True
        if not answer.known:
            return False
        self._probe_targets = list(answer.probe_peers)
        if self._probe_targets and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.create_task(self._probe_loop())
        fingerprint = self.client.link_key_id
        self.client.set_link_security(answer.link_key, answer.link_peers,
                                      answer.link_curve_keys)
        if self.client.link_key_id != fingerprint:
            self._beat_now.set()
        self._apply_soon(answer.assignment)
        await self._update_links(answer.peers, answer.link_key)
        return True

    def _apply_soon(self, assignment: Assignment | None) -> None:
        """Apply the latest assignment in the background: stopping and starting an executor
        can take many seconds on a busy machine, and heartbeats must go on meanwhile (or the
        scheduler evicts a node for loading)."""
        self._latest_assignment = assignment
        if self._apply_task is None or self._apply_task.done():
            self._apply_task = asyncio.create_task(self._apply_latest())

    async def _apply_latest(self) -> None:
        applied = object()
        while self._latest_assignment is not applied:  # an assignment may arrive meanwhile
            applied = self._latest_assignment
            try:
                await self.apply(applied)
            except Exception:  # a failed load is reported by the executor client's state
                logger.exception("applying assignment %s failed", applied)

    async def _update_links(self, peers: list[PeerEndpoint], link_key: str = "") -> None:
        """P2P mode: activations to peers not reachable over tcp go through Lattica relays
        (which pass on only what this pipeline's link key signed)."""
        if self.links is None:
            return
        self.links.relay.set_link_key(link_key)
        aliases = await self.links.update(peers, self.join_message.activation_endpoint)
        if aliases is not None:
            self.client.set_link_aliases(aliases)

    async def _probe_loop(self) -> None:
        """Re-measure the listed peers every --probe-interval (a bounded round each time)."""
        while self._probe_targets:
            try:
                targets = self._probe_targets
                measured = await measure_peers(self._peer_http, targets)
                self._link_reports = self._link_history.update(measured,
                                                               [t.node_id for t in targets])
            except Exception:  # a probe must never take the agent down
                logger.exception("measuring peers failed")
            await asyncio.sleep(self.config.probe_interval_s)
        self._link_reports = []  # no peers listed any more: nothing current to report

    async def leave(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        await self._peer_http.aclose()
        if self._apply_task is not None:
            self._apply_task.cancel()
        try:
            # short: a scheduler stopping at the same time must not hold up this node's exit
            await self._post("/node/leave", NodeLeave(self.join_message.node_id), dict,
                             timeout_s=LEAVE_TIMEOUT_S)
        except (httpx.HTTPError, JoinRejected, msgspec.DecodeError) as exc:
            logger.info("leave not acknowledged: %s", exc)
        await self.http.aclose()

    # ---- state -------------------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        stats, info = self.client.stats, self.client.info
        ready = self.client.state == "ready" and self.frontend.ready and info is not None
        assignment = self.assignment
        return Heartbeat(
            node_id=self.join_message.node_id,
            state="ready" if ready else self.client.state,
            running_requests=stats.num_running, waiting_requests=stats.num_waiting,
            free_blocks=stats.num_free_blocks, total_blocks=stats.num_total_blocks,
            layer_latency_ms=stats.layer_latency_ms,
            loaded_model=assignment.model if ready and assignment is not None else None,
            loaded_quantize=assignment.quantize if ready and assignment is not None else None,
            loaded_start_layer=info.start_layer if ready else None,
            loaded_end_layer=info.end_layer if ready else None,
            error=self.client.error,
            link_key_id=self.client.link_key_id,
            curve_public_key=info.curve_public_key if ready else "",
            download=self.client.download if self.client.state == "loading" else None,
            scheduler_rtt_ms=round(min(self._beat_rtts_ms, default=0.0), 3),
            links=self._link_reports,
        )

    def _same_layers(self, assignment: Assignment | None) -> bool:
        current = self.assignment
        if current is None or assignment is None:
            return current is assignment
        return (current.model, current.quantize, current.start_layer, current.end_layer) == (
            assignment.model, assignment.quantize, assignment.start_layer, assignment.end_layer)

    async def apply(self, assignment: Assignment | None) -> None:
        """Load a new layer range when it changed (only then: nothing else moves)."""
        if self._same_layers(assignment):
            self.assignment = assignment
            return
        self.assignment = assignment
        if self._ready_task is not None:
            self._ready_task.cancel()
        self.frontend.tokenizer = None
        self.frontend._tokenizer_task = None
        if assignment is None:
            self.say("no layers assigned (standby)")
            await self.client.reconfigure(None)
            return
        quantized = f" quantized to {assignment.quantize}" if assignment.quantize else ""
        self.say(f"assigned {assignment.model}{quantized} layers [{assignment.start_layer}, "
                 f"{assignment.end_layer}); loading")
        await self.client.reconfigure(await self._executor_config(assignment))
        self._ready_task = asyncio.create_task(self._announce_ready(assignment))

    async def _executor_config(self, assignment: Assignment) -> ExecutorConfig:
        dtype = self.config.compute_dtype
        kv_bytes = self.config.kv_memory_bytes
        if kv_bytes is None and self.config.memory_bytes:
            weights = await asyncio.to_thread(
                shard_weight_bytes, assignment.model, assignment.start_layer,
                assignment.end_layer, 2 if dtype in ("bfloat16", "float16") else 4,
                assignment.quantize)
            kv_bytes = max(32 * 2**20, int(self.config.memory_bytes * 0.9) - weights)
        return node_executor_config(
            self.config, model=assignment.model, start_layer=assignment.start_layer,
            end_layer=assignment.end_layer, quantize=assignment.quantize,
            kv_memory_bytes=kv_bytes, activation_bind=self.activation_bind,
            activation_endpoint=self.join_message.activation_endpoint,
            link_encryption=self.config.tls.serves_tls,  # CURVE with TLS (link_crypto.py)
        )

    async def _announce_ready(self, assignment: Assignment) -> None:
        try:
            await self.frontend.wait_ready()
        except NotReadyError as exc:
            self.say(f"error: loading layers failed: {exc}")
            return
        from parallax.models.hub import resolve

        self.frontend.model_name = resolve(assignment.model).name
        self.say(f"ready: {self.frontend.model_name} layers [{assignment.start_layer}, "
                 f"{assignment.end_layer})")
        self._beat_now.set()
