"""The scheduler's view of the cluster: nodes, their heartbeats, the allocation, readiness.

Plain data and methods that take `now`, so every rule (replace-on-rejoin, eviction, when a
pipeline counts as ready) is unit-tested without sockets or clocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from parallax.scheduler.allocation import Allocation, ModelSpec, NodeInfo, allocate
from parallax.scheduler.network import LatencyMatrix, probe_targets
from parallax.scheduler.rebalance import degraded_pipelines, rebalance

logger = logging.getLogger("parallax.scheduler")


@dataclass
class NodeRecord:
    """One joined node as the scheduler knows it."""

    node_id: str
    info: NodeInfo
    device: str
    device_name: str
    http_url: str  # the node frontend, e.g. http://10.0.0.5:3000
    activation_endpoint: str  # its executor's ZMQ tcp endpoint
    joined_at: float
    last_seen: float
    running_requests: int = 0
    waiting_requests: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    max_running_requests: int = 64
    layer_latency_ms: float = 0.0
    loaded_model: str | None = None  # what the node reports as loaded and ready
    loaded_quantize: str | None = None  # ... and with which --quantize
    loaded_range: tuple[int, int] | None = None
    peer_id: str | None = None  # P2P mode: requests reach this node over Lattica
    curve_public_key: str = ""  # its executor's activation CURVE key (TLS nodes)
    download: dict | None = None  # loading: its hub download (done/total bytes, rate, ETA)


@dataclass
class Registry:
    heartbeat_timeout_s: float = 15.0
    init_nodes_num: int = 1  # the first allocation waits for this many nodes
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    model: ModelSpec | None = None
    allocation: Allocation | None = None
    generation: int = 0  # bumps whenever the allocation changes
    network: LatencyMatrix = field(default_factory=LatencyMatrix)
    replan_interval_s: float = 10.0  # standby nodes are re-planned with new figures this often
    # every pipeline is weighed against a fresh plan this often (rebalance's `reconsider`)
    reconsider_interval_s: float = 30.0
    _last_replan: float = -float("inf")
    _last_reconsider: float | None = None  # None: no link report yet

    # ---- membership ----------------------------------------------------------------------

    def join(self, record: NodeRecord) -> None:
        """Add a node; a node rejoining with the same id replaces its old entry (no ghosts)."""
        self.nodes[record.node_id] = record
        self._reallocate()

    def heartbeat(self, node_id: str, now: float, **load) -> bool:
        """Record load; False when the node is unknown (evicted): it must join again."""
        record = self.nodes.get(node_id)
        if record is None:
            return False
        record.last_seen = now
        for key, value in load.items():
            setattr(record, key, value)
        return True

    def report_links(self, node_id: str, links: list[tuple[str, float, float]], now: float,
                     scheduler_rtt_ms: float = 0.0) -> int:
        """Record a node's network measurements (peers it may not know are ignored); returns
        how many were taken."""
        if node_id not in self.nodes:
            return 0
        known = [link for link in links if link[0] in self.nodes]
        taken = self.network.report(node_id, known, now, scheduler_rtt_ms)
        if self.model is None or self.allocation is None:
            return taken
        # a pipeline's links degraded: re-plan now; standby nodes may form a pipeline with the
        # new figures (links found near): re-plan now and then (rebalance keeps the rest)
        standby_due = bool(self.allocation.unassigned) \
            and now - self._last_replan >= self.replan_interval_s
        # the first plan may predate most measurements: now and then, look for a clearly
        # cheaper one (the first report only starts the clock, so every node has reported)
        if self._last_reconsider is None:
            self._last_reconsider = now
        reconsider = now - self._last_reconsider >= self.reconsider_interval_s
        if reconsider:
            self._last_reconsider = now
        if reconsider or standby_due \
                or degraded_pipelines(self.allocation, self.model, self.network):
            self._last_replan = now
            self._reallocate(reconsider=reconsider)
        return taken

    def link_latency_ms(self) -> dict[tuple[str, str], float]:
        """One-way cost (ms) of every hop of the current pipelines, forward hops with their
        activation transfer: what routing adds to each pipeline's compute."""
        out: dict[tuple[str, str], float] = {}
        if self.allocation is None:
            return out
        size = self.model.activation_bytes if self.model is not None else 0
        for pipeline in self.allocation.pipelines:
            ids = [s.node_id for s in pipeline]
            for a, b in zip(ids, ids[1:], strict=False):
                out[(a, b)] = self.network.link(a, b).hop_ms(size)
            if len(ids) > 1:
                out[(ids[-1], ids[0])] = self.network.link(ids[-1], ids[0]).hop_ms()
        return out

    def probe_peers(self, node_id: str) -> list[str]:
        """Peers ``node_id`` should measure next: its pipeline's nodes, then the rest in turn."""
        neighbours: list[str] = []
        index = None if self.allocation is None else self.allocation.pipeline_index_of(node_id)
        if index is not None:
            neighbours = [s.node_id for s in self.allocation.pipelines[index]]
        return probe_targets(self.network, node_id, neighbours, self.nodes)

    def leave(self, node_id: str) -> bool:
        if self.nodes.pop(node_id, None) is None:
            return False
        self.network.forget(node_id)
        self._reallocate()
        return True

    def evict_silent(self, now: float) -> list[str]:
        """Drop nodes whose last heartbeat is older than the timeout."""
        silent = [n for n, r in self.nodes.items() if now - r.last_seen > self.heartbeat_timeout_s]
        for node_id in silent:
            del self.nodes[node_id]
            self.network.forget(node_id)
        if silent:
            self._reallocate()
        return silent

    def set_model(self, model: ModelSpec | None) -> None:
        """Switch the model: everything is allocated afresh."""
        self.model = model
        self.allocation = None
        self._reallocate()

    def _reallocate(self, reconsider: bool = False) -> None:
        if self.model is None or (self.allocation is None
                                  and len(self.nodes) < self.init_nodes_num):
            self.allocation = None
            return
        infos = [r.info for r in sorted(self.nodes.values(), key=lambda r: r.joined_at)]
        if self.allocation is None or not self.allocation.pipelines:
            new = allocate(infos, self.model, network=self.network)
        else:
            new = rebalance(self.allocation, infos, self.model, network=self.network,
                            reconsider=reconsider)
        if new != self.allocation:
            self.generation += 1
            logger.info("allocation %d: pipelines %s, planned hop ms %s, standby %s",
                        self.generation,
                        [[s.node_id for s in p] for p in new.pipelines],
                        [round(ms, 1) for ms in new.planned_hop_ms], list(new.unassigned))
        # adopted even when the pipelines are the same: its planned hop costs may be fresher
        # (else a pipeline once judged degraded stays so, and the next join dissolves it)
        self.allocation = new

    # ---- derived state -------------------------------------------------------------------

    def assignment(self, node_id: str) -> tuple[int, int] | None:
        if self.allocation is None:
            return None
        stage = self.allocation.stage_of(node_id)
        return None if stage is None else (stage.start_layer, stage.end_layer)

    def is_ready(self, node_id: str) -> bool:
        record = self.nodes.get(node_id)
        if record is None or self.model is None:
            return False
        return (record.loaded_model == self.model.name
                and record.loaded_quantize == self.model.quantize
                and record.loaded_range == self.assignment(node_id))

    def ready_pipelines(self) -> list[int]:
        """Indices of pipelines whose every node has loaded its assigned range."""
        if self.allocation is None:
            return []
        return [
            index for index, pipeline in enumerate(self.allocation.pipelines)
            if all(self.is_ready(stage.node_id) for stage in pipeline)
        ]

    def status(self) -> str:
        """available | rebalancing | waiting (the contract's three states)."""
        if self.ready_pipelines():
            return "available"
        if self.allocation is not None and self.allocation.pipelines:
            return "rebalancing"
        return "waiting"
