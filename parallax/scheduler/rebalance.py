"""Rebalancing: the allocation after nodes join or leave, or links change, moving as few nodes
as possible. Pure functions over plain data.

Layer ranges are half-open ``[start_layer, end_layer)`` everywhere.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Sequence

from parallax.scheduler.allocation import allocate, check_unique, joined_order, summarize
from parallax.scheduler.grouping import (
    FAR_COST_FACTOR,
    NEAR_RTT_MS,
    candidates,
    hop_cost_ms,
    planned_cost_ms,
    split_in_order,
)
from parallax.scheduler.layout import (
    DEFAULT_KV_RESERVE_TOKENS,
    DEFAULT_MEMORY_FRACTION,
    Allocation,
    ModelSpec,
    Network,
    NodeInfo,
    Stage,
    layer_capacity,
    node_speed,
)
from parallax.scheduler.water_fill import bottleneck_rate

DEGRADED_FACTOR = 2.0
DEGRADED_MIN_MS = 20.0
"""A pipeline is degraded when its hops cost DEGRADED_FACTOR x and DEGRADED_MIN_MS more than
when it was planned."""
REPLAN_MIN_GAIN = 0.25
"""A re-plan for degraded links must cut the mean per-token cost by this share (and by at least
DEGRADED_MIN_MS): a serving pipeline moves only for a clear gain."""

_INF = math.inf


def _covers(pipeline: Sequence[Stage], num_layers: int) -> bool:
    edge = 0
    for stage in pipeline:
        if stage.start_layer != edge:
            return False
        edge = stage.end_layer
    return edge == num_layers and len(pipeline) > 0


def _fits(
    stage: Stage, node: NodeInfo | None, model: ModelSpec, fraction: float, kv_tokens: int
) -> bool:
    if node is None:
        return False
    cap = layer_capacity(
        node,
        model,
        first=stage.start_layer == 0,
        last=stage.end_layer == model.num_layers,
        memory_fraction=fraction,
        kv_reserve_tokens=kv_tokens,
    )
    return stage.num_layers <= cap


def _repair(
    pipeline: tuple[Stage, ...],
    holes: list[int],
    pool: list[NodeInfo],
    model: ModelSpec,
    fraction: float,
    kv_tokens: int,
) -> tuple[Stage, ...] | None:
    """Refill each hole with the smallest free node that holds its exact range; None if not all can be."""
    chosen: dict[int, NodeInfo] = {}
    free = list(pool)
    for h in holes:
        stage = pipeline[h]
        fits = [n for n in free if _fits(stage, n, model, fraction, kv_tokens)]
        if not fits:
            return None
        pick = min(fits, key=lambda n: (n.memory_bytes, -node_speed(n), n.joined_at, n.node_id))
        chosen[h] = pick
        free.remove(pick)
    for pick in chosen.values():
        pool.remove(pick)
    return tuple(
        Stage(chosen[k].node_id, s.start_layer, s.end_layer) if k in chosen else s
        for k, s in enumerate(pipeline)
    )


def _resplit(
    pipeline: tuple[Stage, ...],
    holes: list[int],
    pool: list[NodeInfo],
    nodes: dict[str, NodeInfo],
    model: ModelSpec,
    options: dict[str, float],
    network: Network | None,
) -> tuple[Stage, ...] | None:
    """A pipeline no free node can repair as is, re-split over its survivors in their order,
    either alone or with the free node near them that paces the pipeline fastest in the place
    of the first lost stage; None when neither holds every layer.

    Survivors keep most of their ranges (water-filling moves a boundary only as far as the
    change needs), so this loads little more than the lost layers, where dissolving the pipeline
    would leave its survivors idle until a fresh group forms."""
    survivors = [s.node_id for k, s in enumerate(pipeline) if k not in holes]
    if not survivors:
        return None
    head = survivors[0]
    near = [
        n for n in pool
        if network is None or network(head, n.node_id).rtt_ms <= NEAR_RTT_MS
    ]
    fraction, kv_tokens = options["memory_fraction"], int(options["kv_reserve_tokens"])
    cands = {c.node.node_id: c for c in candidates(
        [nodes[i] for i in survivors] + near, model, fraction, kv_tokens)}
    if any(i not in cands for i in survivors):
        return None
    at = sum(1 for k in range(holes[0]) if k not in holes)  # survivors before the first hole
    best: tuple[float, tuple[Stage, ...], NodeInfo | None] | None = None
    for extra in [None, *near]:
        if extra is not None and extra.node_id not in cands:
            continue
        ids = survivors if extra is None else [*survivors[:at], extra.node_id, *survivors[at:]]
        stages = split_in_order([cands[i] for i in ids], model.num_layers)
        if stages is None:
            continue
        pace = bottleneck_rate([s.num_layers for s in stages],
                               [cands[s.node_id].speed for s in stages])
        if best is None or pace > best[0]:
            best = (pace, stages, extra)
    if best is None:
        return None
    if best[2] is not None:
        pool.remove(best[2])
    return best[1]


def _degraded(now_ms: float, planned_ms: float) -> bool:
    return now_ms > max(DEGRADED_FACTOR * planned_ms, planned_ms + DEGRADED_MIN_MS)


def rebalance(
    previous: Allocation,
    nodes: Sequence[NodeInfo],
    model: ModelSpec,
    *,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS,
    network: Network | None = None,
    reconsider: bool = False,
) -> Allocation:
    """The allocation after nodes joined or left (or links changed), moving as few nodes as
    possible.

    A previous pipeline whose nodes are all present and still fit is kept exactly. One that lost
    nodes is repaired when free nodes (never assigned before) can take each lost range as is;
    otherwise it is re-split over its survivors, alone or with one near free node
    (:func:`_resplit`); failing that it dissolves. Free nodes and survivors of dissolved pipelines are then allocated
    into new pipelines with :func:`allocate`; if no pipeline at all results, a full
    :func:`allocate` over every node decides.

    With a ``network``, pipelines whose hops became degraded (:func:`degraded_pipelines`) are
    re-planned too, but the re-plan is taken only when it lowers the mean per-token cost of the
    allocation's pipelines by :data:`REPLAN_MIN_GAIN` (and at least :data:`DEGRADED_MIN_MS`):
    otherwise they are kept, with their current hop cost as the new planned figure (so
    measurement noise on links that are all alike never moves a serving pipeline).
    ``reconsider`` puts every pipeline through that test, degraded or not: a pipeline planned
    while its links were already slow (before its nodes had measured the others) never
    degrades, yet a clearly cheaper pairing may have appeared since.
    """
    check_unique(nodes)
    options = {"memory_fraction": memory_fraction, "kv_reserve_tokens": kv_reserve_tokens}
    by_id = {n.node_id: n for n in nodes}
    present = [
        i for i, p in enumerate(previous.pipelines) if all(s.node_id in by_id for s in p)
    ]
    slower = set(degraded_pipelines(previous, model, network, present))
    degraded = set(present) if reconsider and network is not None else slower
    replan, _ = _rebalance(previous, nodes, model, degraded, network, options)
    if not degraded:
        return replan
    keep, _ = _rebalance(previous, nodes, model, set(), network, options, refresh=degraded)
    # the free nodes may not route around the slow link: a full re-plan may
    candidates = [replan, allocate(nodes, model, network=network, **options)]
    cost = {id(a): mean_cost_ms(a, by_id, model, network) for a in (keep, *candidates)}
    cheapest = min(cost[id(a)] for a in candidates)
    # of the (nearly) cheapest, the one with the most pipelines: capacity breaks the tie
    best = max(
        (a for a in candidates if cost[id(a)] <= cheapest + DEGRADED_MIN_MS),
        key=lambda a: (len(a.pipelines), -cost[id(a)]),
    )
    gain = cost[id(keep)] - cost[id(best)]
    if not slower and len(best.pipelines) < len(keep.pipelines):
        return keep  # a lower mean cost from fewer pipelines is lost capacity, not a gain
    return best if gain >= max(DEGRADED_MIN_MS, REPLAN_MIN_GAIN * cost[id(keep)]) else keep


def mean_cost_ms(
    allocation: Allocation,
    nodes: dict[str, NodeInfo],
    model: ModelSpec,
    network: Network | None = None,
) -> float:
    """Mean planned per-token cost (:func:`planned_cost_ms`) of an allocation's pipelines
    (infinite when it has none)."""
    if not allocation.pipelines:
        return _INF
    costs = [planned_cost_ms(p, nodes, model, network) for p in allocation.pipelines]
    return sum(costs) / len(costs)


def _rebalance(
    previous: Allocation,
    nodes: Sequence[NodeInfo],
    model: ModelSpec,
    dissolve: set[int],
    network: Network | None,
    options: dict[str, float],
    refresh: Collection[int] = (),
) -> tuple[Allocation, tuple[tuple[Stage, ...], ...]]:
    """:func:`rebalance` with the pipelines at indices ``dissolve`` re-planned and those at
    ``refresh`` kept with their current hop cost as planned; also returns the new pipelines."""
    fraction, kv_tokens = options["memory_fraction"], int(options["kv_reserve_tokens"])
    by_id = {n.node_id: n for n in nodes}
    before = {s.node_id for p in previous.pipelines for s in p}
    pool = [n for n in joined_order(nodes) if n.node_id not in before]
    kept: list[tuple[Stage, ...]] = []
    planned: list[float] = []
    loose: list[NodeInfo] = []
    for index, pipeline in enumerate(previous.pipelines):
        holes = [
            k
            for k, s in enumerate(pipeline)
            if not _fits(s, by_id.get(s.node_id), model, fraction, kv_tokens)
        ]
        fixed = None
        if _covers(pipeline, model.num_layers) and index not in dissolve:
            fixed = _repair(pipeline, holes, pool, model, fraction, kv_tokens) if holes else pipeline
            if fixed is None:
                fixed = _resplit(pipeline, holes, pool, by_id, model, options, network)
        if fixed is not None:
            kept.append(fixed)
            same = not holes and index not in refresh and index < len(previous.planned_hop_ms)
            hops = hop_cost_ms(fixed, network, model.activation_bytes)
            planned.append(previous.planned_hop_ms[index] if same else hops)
            loose.extend(by_id[pipeline[k].node_id] for k in holes if pipeline[k].node_id in by_id)
        else:
            loose.extend(by_id[s.node_id] for s in pipeline if s.node_id in by_id)
    fresh = allocate(pool + loose, model, network=network, **options)
    if not kept and not fresh.pipelines:
        return allocate(nodes, model, network=network, **options), ()
    fresh = _drop_far(fresh, kept, by_id, model, network)
    pipelines = (*kept, *fresh.pipelines)
    result = Allocation(
        pipelines,
        fresh.unassigned,
        False,
        summarize(pipelines, fresh.unassigned),
        (*planned, *fresh.planned_hop_ms),
    )
    return result, fresh.pipelines


def _drop_far(
    fresh: Allocation,
    kept: Sequence[tuple[Stage, ...]],
    nodes: dict[str, NodeInfo],
    model: ModelSpec,
    network: Network | None,
) -> Allocation:
    """The rule :func:`allocate` applies to cross-region pipelines, against the kept ones: a
    new pipeline with a hop over NEAR_RTT_MS that costs more than FAR_COST_FACTOR × the kept
    pipelines' median is left out, its nodes standby (else a pipeline re-planned away from a
    slow link forms again from the freed nodes on the next rebalance)."""
    if network is None or not kept or not fresh.pipelines:
        return fresh
    limit = FAR_COST_FACTOR * statistics.median(
        planned_cost_ms(p, nodes, model, network) for p in kept
    )
    keep = [
        k
        for k, p in enumerate(fresh.pipelines)
        if not _has_far_hop(p, network) or planned_cost_ms(p, nodes, model, network) <= limit
    ]
    if len(keep) == len(fresh.pipelines):
        return fresh
    pipelines = tuple(fresh.pipelines[k] for k in keep)
    dropped = tuple(s.node_id for k, p in enumerate(fresh.pipelines) if k not in keep for s in p)
    unassigned = (*fresh.unassigned, *dropped)
    return Allocation(
        pipelines,
        unassigned,
        False,
        summarize(pipelines, unassigned),
        tuple(fresh.planned_hop_ms[k] for k in keep),
    )


def _has_far_hop(pipeline: Sequence[Stage], network: Network) -> bool:
    ids = [s.node_id for s in pipeline]
    return any(network(a, b).rtt_ms > NEAR_RTT_MS for a, b in zip(ids, ids[1:], strict=False))


def degraded_pipelines(
    allocation: Allocation,
    model: ModelSpec,
    network: Network | None,
    indices: Sequence[int] | None = None,
) -> list[int]:
    """Indices (of ``indices``, default all) of pipelines whose hops now cost more than
    DEGRADED_FACTOR × (and at least DEGRADED_MIN_MS more than) when they were planned; a
    pipeline planned without figures counts as planned at 0 ms, so the first real measurements
    can re-plan it."""
    if network is None:
        return []
    out = []
    for index in range(len(allocation.pipelines)) if indices is None else indices:
        pipeline = allocation.pipelines[index]
        planned = allocation.planned_hop_ms[index] if index < len(allocation.planned_hop_ms) else 0
        if _degraded(hop_cost_ms(pipeline, network, model.activation_bytes), planned):
            out.append(index)
    return out


def moved_nodes(previous: Allocation, new: Allocation) -> set[str]:
    """Nodes present in ``new`` whose layer range differs from ``previous`` (they must reload).

    Includes nodes that gained a range, lost theirs (now unassigned) or got another one; nodes
    that left the cluster are not listed.
    """
    old = {s.node_id: (s.start_layer, s.end_layer) for p in previous.pipelines for s in p}
    cur = {s.node_id: (s.start_layer, s.end_layer) for p in new.pipelines for s in p}
    return {n for n in (*cur, *new.unassigned) if old.get(n) != cur.get(n)}
