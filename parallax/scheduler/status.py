"""What the scheduler shows: the cluster status object, its change feed, the join command, and
the scheduler's Prometheus metrics. Building the status object is a pure function of the registry.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from parallax.net import WILDCARD_HOSTS, lan_address
from parallax.node.tracing import hop_list
from parallax.p2p.peer import peer_addresses
from parallax.scheduler.registry import Registry
from parallax.serving.metrics import (
    BYTES_BUCKETS,
    STEP_BUCKETS,
    TPS_BUCKETS,
    TRANSFER_BUCKETS,
    TTFT_BUCKETS,
)
from parallax.serving.sse import encode_event

if TYPE_CHECKING:
    from parallax.p2p.roles import P2PPeer

# what non-operators see instead of the join token
TOKEN_PLACEHOLDER = "<token>"
MAX_TRACE_LABELS = 256  # node and link label values of the trace histograms


def join_command(host: str, port: int, tls: bool = False) -> str:
    """`parallax join -s HOST:PORT`, HOST reachable from other machines (no token: see
    :func:`with_join_token`); a TLS scheduler's names https and the node's TLS files."""
    address = lan_address() if host in WILDCARD_HOSTS else host
    if ":" in address:  # IPv6 literal
        address = f"[{address}]"
    if tls:
        return (f"parallax join -s {shlex.quote(f'https://{address}:{port}')} "
                "--tls-certfile NODE.pem --tls-keyfile NODE.key --tls-ca-file CA.pem")
    return f"parallax join -s {shlex.quote(f'{address}:{port}')}"


def p2p_join_command(peer: P2PPeer, host: str, port: int, relays: tuple[str, ...]) -> str:
    """What a node runs to join a P2P scheduler whose Lattica `peer` listens on `port` (no
    token: see :func:`with_join_token`): by peer id through the relays when there are any (behind
    NAT), else at the peer's first dialable multiaddr (`host` when it sees none)."""
    if relays:
        return f"parallax join -s {peer.peer_id}" + "".join(
            f" --relay {shlex.quote(r)}" for r in relays)
    return f"parallax join -s {shlex.quote(peer_addresses(peer.peer, host, port)[0])}"


def with_join_token(command: str, join_token: str | None, *, reveal: bool) -> str:
    """`command` plus `--join-token`: the real token (shell-quoted) for the operator, else
    a placeholder. Unchanged when the cluster has no token."""
    if not join_token:
        return command
    return f"{command} --join-token {shlex.quote(join_token) if reveal else TOKEN_PLACEHOLDER}"


def node_status(registry: Registry, node_id: str, reported_state: str | None) -> str:
    """ready | loading | error | standby (holds no layers) | waiting (no allocation yet)."""
    if registry.model is None or registry.allocation is None:
        return "waiting"
    if registry.assignment(node_id) is None:
        return "standby"
    if registry.is_ready(node_id):
        return "ready"
    return "error" if reported_state == "error" else "loading"


def max_running_requests(registry: Registry) -> int:
    """Requests the ready pipelines admit at once: Σ over them of their smallest node's limit."""
    if registry.allocation is None:
        return 0
    total = 0
    for index in registry.ready_pipelines():
        pipeline = registry.allocation.pipelines[index]
        total += min(registry.nodes[s.node_id].max_running_requests for s in pipeline)
    return total


def _reason(registry: Registry) -> str:
    if registry.model is None:
        return "no model selected: POST /scheduler/init"
    if registry.allocation is None:
        missing = registry.init_nodes_num - len(registry.nodes)
        return f"waiting for {missing} more node(s) before the first allocation"
    if registry.allocation.need_more_nodes:
        return registry.allocation.reason
    if not registry.ready_pipelines():
        return "nodes are loading their layers"
    return registry.allocation.reason


def cluster_status(
    registry: Registry,
    *,
    node_join_command: str,
    running: Mapping[str, int] | None = None,
    reported_states: Mapping[str, str] | None = None,
    stage_ms: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The `cluster_status` event: `{"type": "cluster_status", "data": {...}}`.

    `running` overrides a node's running-request count (the scheduler's own, fresher figure);
    `reported_states` holds each node's last heartbeat `state` (to show "error"); `stage_ms` each
    node's compute ms per token in its latest request trace (else its heartbeat's per-layer
    latency times its layers stands in).
    """
    stage_ms = stage_ms or {}
    running = running or {}
    reported_states = reported_states or {}
    allocation = registry.allocation
    need_more = registry.model is not None and (allocation is None or allocation.need_more_nodes)
    nodes = []
    for record in sorted(registry.nodes.values(), key=lambda r: (r.joined_at, r.node_id)):
        layers = registry.assignment(record.node_id)
        nodes.append({
            "node_id": record.node_id,
            "status": node_status(registry, record.node_id, reported_states.get(record.node_id)),
            "device": record.device,
            "device_name": record.device_name,
            "memory_gb": round(record.info.memory_bytes / 2**30, 2),
            "start_layer": None if layers is None else layers[0],
            "end_layer": None if layers is None else layers[1],
            "running_requests": running.get(record.node_id, record.running_requests),
            "gflops": round(record.info.gflops, 1),
            "layer_latency_ms": round(record.layer_latency_ms, 3),
            "ms_per_token": _ms_per_token(record, layers, stage_ms.get(record.node_id)),
            # how its activation links travel: CURVE-encrypted, libp2p (P2P), or in the clear
            "link_encryption": "curve" if record.curve_public_key else (
                "libp2p" if record.peer_id else "none"),
            "download": record.download,  # a loading node's hub download, else None
        })
    pipelines = [] if allocation is None else [
        [stage.node_id for stage in pipeline] for pipeline in allocation.pipelines]
    ready = registry.ready_pipelines()
    return {
        "type": "cluster_status",
        "data": {
            "status": registry.status(),
            "model_name": None if registry.model is None else registry.model.name,
            "init_nodes_num": registry.init_nodes_num,
            "need_more_nodes": need_more,
            "node_join_command": node_join_command,
            "max_running_request": max_running_requests(registry),
            "node_list": nodes,
            "pipelines": pipelines,
            "ready_pipelines": ready,
            # a pipeline serves while another one is still loading (the chat stays open)
            "rebalancing": 0 < len(ready) < len(pipelines),
            "reason": _reason(registry),
        },
    }


def _ms_per_token(record: Any, layers: tuple[int, int] | None,
                  traced: float | None) -> float | None:
    """A stage's compute per token: from its latest trace, else per-layer latency x layers."""
    if layers is None:
        return None
    if traced is not None:
        return round(traced, 3)
    if not record.layer_latency_ms:
        return None
    return round(record.layer_latency_ms * (layers[1] - layers[0]), 3)


class StatusHub:
    """A version counter with a wake-up: every change (join, heartbeat, request...) bumps it."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen: int, timeout: float) -> int:
        """Return once the version differs from `seen` or `timeout` seconds passed."""
        if self.version == seen:
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.version


async def status_events(
    hub: StatusHub,
    snapshot: Callable[[], dict[str, Any]],
    *,
    interval_s: float = 2.0,
    min_gap_s: float = 0.1,
) -> AsyncIterator[bytes]:
    """SSE bytes: the status now, then on every change (at most every `min_gap_s`) and at least
    every `interval_s`. Ends when the consumer stops iterating (client gone)."""
    last: dict[str, Any] | None = None
    sent_at = 0.0
    seen = hub.version
    while True:
        current = snapshot()
        now = time.monotonic()
        if current != last or now - sent_at >= interval_s:
            yield encode_event(current)
            last, sent_at = current, now
            await asyncio.sleep(min_gap_s)
        remaining = interval_s - (time.monotonic() - sent_at)
        seen = await hub.wait(seen, max(0.01, remaining))


class ClusterMetrics:
    """The scheduler's Prometheus metrics, in a registry of its own (many apps per process OK)."""

    def __init__(self, namespace: str = "parallax_scheduler") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.node_running = Gauge("node_running_requests", "Requests running on a node "
                                  "(the scheduler's count plus load the node reports)",
                                  ["node"], namespace=ns, registry=r)
        self.node_ready = Gauge("node_ready", "1 when the node serves its assigned layers",
                                ["node"], namespace=ns, registry=r)
        self.queue_depth = Gauge("queue_depth", "Requests waiting for a pipeline with room",
                                 namespace=ns, registry=r)
        self.pipelines_ready = Gauge("pipelines_ready", "Pipelines able to serve",
                                     namespace=ns, registry=r)
        self.requests = Counter("requests", "Chat requests by outcome (HTTP status)",
                                ["status"], namespace=ns, registry=r)
        self.pipeline_requests = Counter("pipeline_requests", "Requests forwarded to a pipeline",
                                         ["pipeline"], namespace=ns, registry=r)
        self.pipeline_tokens = Counter("pipeline_completion_tokens", "Completion tokens a "
                                       "pipeline produced (from final chunks' usage)",
                                       ["pipeline"], namespace=ns, registry=r)
        self.retries = Counter("route_retries", "Routing waits and head-node retries",
                               ["reason"], namespace=ns, registry=r)
        self.ttft = Histogram("time_to_first_token_seconds", "TTFT reported by head nodes",
                              buckets=TTFT_BUCKETS, namespace=ns, registry=r)
        self.tps = Histogram("tokens_per_second", "Decode speed reported by head nodes",
                             buckets=TPS_BUCKETS, namespace=ns, registry=r)
        # from the traces in final chunks (parallax/node/tracing.py): per node and per link
        self.stage_step = Histogram("stage_step_seconds", "A stage's compute per step (one "
                                    "token) of a request, from its trace", ["node"],
                                    buckets=STEP_BUCKETS, namespace=ns, registry=r)
        self.stage_queue = Histogram("stage_queue_seconds", "Time a request queued on a stage "
                                     "in all, from its trace", ["node"], buckets=STEP_BUCKETS,
                                     namespace=ns, registry=r)
        self.link_transfer = Histogram("link_transfer_seconds", "A hop's transfer time per "
                                       "message of a request, from its trace", ["link"],
                                       buckets=TRANSFER_BUCKETS, namespace=ns, registry=r)
        self.link_bytes = Histogram("link_bytes", "Bytes a request sent over a hop, from its "
                                    "trace", ["link"], buckets=BYTES_BUCKETS, namespace=ns,
                                    registry=r)
        self._labels: set[str] = set()

    def observe_final(self, pipeline: str, final: Mapping[str, Any]) -> None:
        """Record a final chunk / completion body's `metrics` and `usage`."""
        metrics = final.get("metrics") or {}
        if isinstance(metrics.get("ttft_ms"), (int, float)):
            self.ttft.observe(metrics["ttft_ms"] / 1000.0)
        if isinstance(metrics.get("tps"), (int, float)) and metrics["tps"] > 0:
            self.tps.observe(metrics["tps"])
        usage = final.get("usage") or {}
        tokens = usage.get("completion_tokens")
        if isinstance(tokens, int) and tokens > 0:
            self.pipeline_tokens.labels(pipeline=pipeline).inc(tokens)
        if isinstance(metrics, dict):
            self._observe_trace(metrics)

    def _observe_trace(self, metrics: Mapping[str, Any]) -> None:
        """Stage and hop histograms from a final chunk's trace summary (label sets bounded)."""
        stages = [s for s in metrics.get("stages") or [] if isinstance(s, dict)]
        for stage in stages:
            node, per_token = str(stage.get("node_id")), stage.get("ms_per_token")
            if isinstance(per_token, (int, float)) and self._room_for(node):
                self.stage_step.labels(node=node).observe(per_token / 1000.0)
                if isinstance(stage.get("queue_ms"), (int, float)):
                    self.stage_queue.labels(node=node).observe(stage["queue_ms"] / 1000.0)
        steps = max([s.get("steps") or 0 for s in stages if isinstance(s.get("steps"), int)]
                    or [0])
        for hop in hop_list(dict(metrics)):
            link = f"{hop['from']}->{hop['to']}"
            if not isinstance(hop["ms"], (int, float)) or not self._room_for(link):
                continue
            self.link_transfer.labels(link=link).observe(hop["ms"] / 1000.0 / max(1, steps))
            if isinstance(hop["bytes"], int):
                self.link_bytes.labels(link=link).observe(hop["bytes"])

    def _room_for(self, label: str) -> bool:
        if label in self._labels or len(self._labels) < MAX_TRACE_LABELS:
            self._labels.add(label)
            return True
        return False

    def set_nodes(self, running: Mapping[str, int], ready: Mapping[str, bool],
                  pipelines_ready: int, queue_depth: int) -> None:
        """Refresh the gauges (before a scrape); nodes gone since the last one disappear."""
        self.node_running.clear()
        self.node_ready.clear()
        for node_id, count in running.items():
            self.node_running.labels(node=node_id).set(count)
        for node_id, flag in ready.items():
            self.node_ready.labels(node=node_id).set(1 if flag else 0)
        self.pipelines_ready.set(pipelines_ready)
        self.queue_depth.set(queue_depth)

    def render(self) -> tuple[bytes, str]:
        """Text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
