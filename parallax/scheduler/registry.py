"""The scheduler's view of the cluster: nodes, their heartbeats, the allocation, readiness.

Plain data and methods that take `now`, so every rule (replace-on-rejoin, eviction, when a
pipeline counts as ready) is unit-tested without sockets or clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parallax.scheduler.allocation import Allocation, ModelSpec, NodeInfo, allocate, rebalance


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

    def leave(self, node_id: str) -> bool:
        if self.nodes.pop(node_id, None) is None:
            return False
        self._reallocate()
        return True

    def evict_silent(self, now: float) -> list[str]:
        """Drop nodes whose last heartbeat is older than the timeout."""
        silent = [n for n, r in self.nodes.items() if now - r.last_seen > self.heartbeat_timeout_s]
        for node_id in silent:
            del self.nodes[node_id]
        if silent:
            self._reallocate()
        return silent

    def set_model(self, model: ModelSpec | None) -> None:
        """Switch the model: everything is allocated afresh."""
        self.model = model
        self.allocation = None
        self._reallocate()

    def _reallocate(self) -> None:
        if self.model is None or (self.allocation is None
                                  and len(self.nodes) < self.init_nodes_num):
            self.allocation = None
            return
        infos = [r.info for r in sorted(self.nodes.values(), key=lambda r: r.joined_at)]
        if self.allocation is None or not self.allocation.pipelines:
            new = allocate(infos, self.model)
        else:
            new = rebalance(self.allocation, infos, self.model)
        if new != self.allocation:
            self.allocation = new
            self.generation += 1

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
