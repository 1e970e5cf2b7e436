"""Layer allocation: which node holds which decoder layers. Pure functions over plain data.

- :func:`layer_capacity`: memory decides how many layers fit on a node in a given role (the first
  stage also holds the embedding, the last one the final norm + LM head).
- :func:`parallax.scheduler.water_fill.water_fill`: speed decides how many layers each node of one pipeline gets.
- :func:`allocate`: picks node-disjoint pipelines, each covering ``[0, num_layers)``.
- :func:`parallax.scheduler.rebalance.rebalance`: after a join or a leave, keeps every pipeline
  that is still valid.

Choosing the pipelines (:func:`allocate`). A node that holds the whole model is a pipeline of
one. Otherwise a group starts with the largest free node and grows by the smallest free node that
completes it (or, failing that, by the largest free node), which wastes little capacity, so many
groups form, and large nodes end up in short groups. Groups form until the free nodes cannot
complete another; then the ``k`` shortest groups are kept for the ``k`` that maximises
``k² / total stages`` (ties: more pipelines), the objective of Gradient's Parallax: replicas are
worth more, long pipelines less. Nodes left over stay ``unassigned`` (standby for repairs and
later joins). On random instances of up to 7 nodes this matched the exhaustive optimum in 594 of
600 cases (a contiguous-runs dynamic program over the capacity order: 473). Cost: about
``O(n log n + n·g)`` for groups of ``g`` nodes.

With a ``network`` (link figures between nodes, :mod:`parallax.scheduler.network`), nodes are
first split into regions: each region is a leader (the largest node not yet placed) and every
remaining node within :data:`NEAR_RTT_MS` of it. Groups form inside each region, first among
nodes of similar speed (:data:`SPEED_TIER_GAP`), then from the rest of the region; every
regional group is kept (the k² rule applies without a network: with one, routing sends requests
to the cheaper pipelines first, and a longer regional pipeline still adds throughput). The nodes
a region cannot use pool into cross-region groups, which are kept only when their per-token cost
(:mod:`parallax.scheduler.cost`) is within :data:`FAR_COST_FACTOR` of the regional pipelines'
median: a far node stays standby when near ones can do the job. A region's mixed leftovers group
by capacity or in runs of consecutive speed, whichever paces faster (a pipeline runs at its
slowest stage's speed ÷ layers; a fast node with little memory tied to a slow one that must take
many layers wastes the fast one). Then each spare node joins the near pipeline whose pace it
raises most (:data:`ATTACH_MIN_GAIN` of its own share at least, at most
:data:`ATTACH_MAX_STAGES` stages), and a pipeline paced below :data:`DISSOLVE_EFFICIENCY` of its
ideal dissolves when its nodes add more elsewhere. Stages are ordered so each hop goes to the
nearest remaining node. :func:`parallax.scheduler.rebalance.rebalance` re-plans a pipeline whose hops got slower.

The pieces live in :mod:`~parallax.scheduler.layout` (data, capacity, speed),
:mod:`~parallax.scheduler.water_fill`, :mod:`~parallax.scheduler.grouping` (forming pipelines)
and :mod:`~parallax.scheduler.rebalance`; this module re-exports the data names.

Layer ranges are half-open ``[start_layer, end_layer)`` everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from parallax.scheduler.grouping import (
    ATTACH_MAX_STAGES,
    ATTACH_MIN_GAIN,
    DISSOLVE_EFFICIENCY,
    FAR_COST_FACTOR,
    NEAR_RTT_MS,
    SPEED_TIER_GAP,
    Candidate,
    best_roles,
    build_pipeline,
    candidates,
    choose_groups,
    greedy_groups,
    hop_cost_ms,
    network_groups,
    planned_cost_ms,
)
from parallax.scheduler.layout import (
    DECODE_INTENSITY,
    DEFAULT_KV_RESERVE_TOKENS,
    DEFAULT_MEMORY_FRACTION,
    Allocation,
    ModelSpec,
    Network,
    NodeInfo,
    Stage,
    layer_bytes_with_kv,
    layer_capacity,
    node_speed,
)
from parallax.scheduler.water_fill import water_fill

__all__ = [
    "ATTACH_MAX_STAGES", "ATTACH_MIN_GAIN", "DISSOLVE_EFFICIENCY", "DECODE_INTENSITY",
    "DEFAULT_KV_RESERVE_TOKENS", "DEFAULT_MEMORY_FRACTION",
    "FAR_COST_FACTOR", "NEAR_RTT_MS", "SPEED_TIER_GAP", "Allocation", "ModelSpec", "Network",
    "NodeInfo", "Stage", "allocate", "hop_cost_ms", "layer_bytes_with_kv", "layer_capacity",
    "node_speed", "planned_cost_ms", "water_fill",
]


def check_unique(nodes: Sequence[NodeInfo]) -> None:
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate node_id in nodes")


def _shortfall(
    cands: list[Candidate],
    nodes: Sequence[NodeInfo],
    model: ModelSpec,
    per_layer: int,
    fraction: float,
) -> str:
    """Why no complete pipeline exists, and how much is missing."""
    if not nodes:
        return (
            f"no nodes yet; {model.name} needs about {model.total_bytes / 2**30:.2f} GiB of weights"
        )
    if not cands:
        need = per_layer / fraction / 2**30
        return f"no node has room for one layer; each needs at least {need:.2f} GiB of memory"
    held = best_roles(cands)[2]
    if held < 0:
        return "no two nodes can hold the embedding (first stage) and the LM head (last stage)"
    missing = model.num_layers - held
    if missing <= 0:
        return f"the {len(cands)} usable nodes cannot form a pipeline of at most {model.num_layers} stages"
    more = missing * per_layer / fraction
    return (
        f"the {len(cands)} usable nodes together hold {held} of {model.num_layers} layers: "
        f"{missing} more layers needed, about {more / 2**30:.2f} GiB ({int(more)} bytes) more memory"
    )


def allocate(
    nodes: Sequence[NodeInfo],
    model: ModelSpec,
    *,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS,
    network: Network | None = None,
) -> Allocation:
    """Node-disjoint pipelines over ``nodes``, each covering ``[0, model.num_layers)``.

    Picks the number of pipelines by maximising k² / total stages (module docstring), orders each
    pipeline so the first and last stages can hold the embedding and LM head, and water-fills its
    layers by :func:`node_speed`. With a ``network`` near nodes are grouped with near ones and
    far pipelines are kept only when they cost little more (module docstring). Unused nodes are
    listed in ``unassigned``; when no complete pipeline exists ``need_more_nodes`` is set and
    ``reason`` says what is missing.
    """
    check_unique(nodes)
    cands = candidates(nodes, model, memory_fraction, kv_reserve_tokens)
    if network is None:
        groups = choose_groups(greedy_groups(cands, model.num_layers)[0])
        pipelines = tuple(build_pipeline(g, model.num_layers) for g in groups)
    else:
        pipelines = tuple(network_groups(cands, model, network))
    used = {s.node_id for p in pipelines for s in p}
    unassigned = tuple(n.node_id for n in joined_order(nodes) if n.node_id not in used)
    if not pipelines:
        per_layer = layer_bytes_with_kv(model, kv_reserve_tokens)
        reason = _shortfall(cands, nodes, model, per_layer, memory_fraction)
        return Allocation((), unassigned, True, reason)
    hops = tuple(hop_cost_ms(p, network, model.activation_bytes) for p in pipelines)
    return Allocation(pipelines, unassigned, False, summarize(pipelines, unassigned), hops)


def joined_order(nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
    return sorted(nodes, key=lambda n: (n.joined_at, n.node_id))


def summarize(pipelines: Sequence[Sequence[Stage]], unassigned: Sequence[str]) -> str:
    stages = sum(len(p) for p in pipelines)
    return f"{len(pipelines)} pipeline(s) over {stages} node(s), {len(unassigned)} unassigned"
