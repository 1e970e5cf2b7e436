"""The plain data of allocation: the model, the nodes, stages and allocations, and how many
layers a node can hold (memory) and how fast it runs them (roofline). Pure functions.

Layer ranges are half-open ``[start_layer, end_layer)`` everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from parallax.scheduler.cost import Link

DEFAULT_MEMORY_FRACTION = 0.85
"""Share of a node's reported memory that allocation may plan with (rest: activations, runtime)."""
DEFAULT_KV_RESERVE_TOKENS = 4096
"""Every layer a node takes must come with KV-cache room for at least this many tokens."""
DECODE_INTENSITY = 8.0
"""FLOPs per weight byte assumed by :func:`node_speed` (≈ a decode batch of 8 on 16-bit weights)."""

Network = Callable[[str, str], Link]
"""Link figures between two node ids (a :class:`parallax.scheduler.network.LatencyMatrix`)."""

@dataclass(frozen=True)
class ModelSpec:
    """Memory shape of a model. Bytes are as loaded (after any dtype conversion)."""

    name: str
    num_layers: int
    layer_bytes: int
    embedding_bytes: int
    lm_head_bytes: int
    """Final norm + LM head; with tied embeddings still the embedding matrix's size."""
    kv_bytes_per_token_per_layer: int
    tie_word_embeddings: bool = False
    """When tied, a stage that is both first and last holds the shared matrix once."""
    quantize: str | None = None
    """q8_0 / q4_0 / q4_k: nodes pack the float weights at load (bytes above count that)."""
    activation_bytes: int = 0
    """One token's hidden state on the wire (hidden size × dtype bytes); 0: unknown."""

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.layer_bytes < 1:
            raise ValueError("a model needs at least one layer of at least one byte")
        if min(self.embedding_bytes, self.lm_head_bytes, self.kv_bytes_per_token_per_layer) < 0:
            raise ValueError("byte counts cannot be negative")

    def extra_bytes(self, *, first: bool, last: bool) -> int:
        """Bytes beyond the decoder layers that a stage in this role holds."""
        if first and last and self.tie_word_embeddings:
            return max(self.embedding_bytes, self.lm_head_bytes)
        return self.embedding_bytes * first + self.lm_head_bytes * last

    @property
    def total_bytes(self) -> int:
        """Weights of the whole model on one node (embedding, every layer, norm + LM head)."""
        return self.num_layers * self.layer_bytes + self.extra_bytes(first=True, last=True)


@dataclass(frozen=True)
class NodeInfo:
    """What a joining node reports about itself."""

    node_id: str
    memory_bytes: int
    gflops: float
    bandwidth_gbps: float
    joined_at: float = 0.0


@dataclass(frozen=True)
class Stage:
    """One node's share of a pipeline: decoder layers ``[start_layer, end_layer)``."""

    node_id: str
    start_layer: int
    end_layer: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.end_layer:
            raise ValueError(f"bad layer range [{self.start_layer}, {self.end_layer})")

    @property
    def num_layers(self) -> int:
        """How many decoder layers this stage runs."""
        return self.end_layer - self.start_layer


@dataclass(frozen=True)
class Allocation:
    """Node-disjoint pipelines, each a tuple of stages covering every layer in order."""

    pipelines: tuple[tuple[Stage, ...], ...]
    unassigned: tuple[str, ...]
    need_more_nodes: bool
    reason: str
    planned_hop_ms: tuple[float, ...] = field(default=(), compare=False)
    """Each pipeline's Σ hop cost when it was planned (rebalance compares against it)."""

    def stage_of(self, node_id: str) -> Stage | None:
        """The stage ``node_id`` runs, or None when it holds no layers."""
        for pipeline in self.pipelines:
            for stage in pipeline:
                if stage.node_id == node_id:
                    return stage
        return None

    def pipeline_index_of(self, node_id: str) -> int | None:
        """Index of the pipeline ``node_id`` belongs to, or None."""
        for index, pipeline in enumerate(self.pipelines):
            if any(stage.node_id == node_id for stage in pipeline):
                return index
        return None


def layer_bytes_with_kv(
    model: ModelSpec, kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS
) -> int:
    """Memory one decoder layer costs: its weights plus ``kv_reserve_tokens`` tokens of KV cache."""
    return model.layer_bytes + kv_reserve_tokens * model.kv_bytes_per_token_per_layer


def layer_capacity(
    node: NodeInfo,
    model: ModelSpec,
    *,
    first: bool,
    last: bool,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS,
) -> int:
    """How many decoder layers fit on ``node`` in this role, in ``[0, model.num_layers]``.

    ``floor((memory × memory_fraction − embedding if first − LM head if last) /
    (layer bytes + kv_reserve_tokens × KV bytes per token per layer))``: a node with room for
    weights but not for ``kv_reserve_tokens`` tokens of KV per layer gets fewer (or no) layers.
    """
    budget = node.memory_bytes * memory_fraction - model.extra_bytes(first=first, last=last)
    if budget <= 0:
        return 0
    return min(model.num_layers, int(budget // layer_bytes_with_kv(model, kv_reserve_tokens)))


def node_speed(node: NodeInfo, *, intensity: float = DECODE_INTENSITY) -> float:
    """Roofline speed in weight-GB/s: ``min(gflops / intensity, bandwidth_gbps)``.

    Decode reads every weight once per step and does ``intensity`` FLOPs per byte, so a node is
    limited by whichever of compute and memory bandwidth is slower. An unknown (0) figure is
    ignored; both unknown gives 0 (``water_fill`` then treats the node as the slowest).
    """
    known = [v for v in (node.gflops / intensity, node.bandwidth_gbps) if v > 0]
    return min(known) if known else 0.0
