"""Forming pipelines: which nodes group into one pipeline, in what order (see
:mod:`parallax.scheduler.allocation` for the rules). Pure functions over plain data.

Layer ranges are half-open ``[start_layer, end_layer)`` everywhere.
"""

from __future__ import annotations

import bisect
import heapq
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from parallax.scheduler.cost import LOOPBACK, layer_latency_ms, pipeline_token_cost_ms
from parallax.scheduler.layout import (
    ModelSpec,
    Network,
    NodeInfo,
    Stage,
    layer_capacity,
    node_speed,
)
from parallax.scheduler.water_fill import water_fill

NEAR_RTT_MS = 20.0
"""Nodes within this RTT of a region's leader belong to its region."""
FAR_COST_FACTOR = 2.0
"""A cross-region pipeline is used only when it costs at most this × the regional median."""
SPEED_TIER_GAP = 1.5
"""Within a region, pipelines form first among nodes whose speeds differ less than this."""

_INF = math.inf


@dataclass(frozen=True)
class Candidate:
    """A usable node: its layer capacity in each role (middle, first, last, alone) and speed."""

    node: NodeInfo
    mid: int  # capacity as a middle stage
    first: int
    last: int
    solo: int  # first and last at once
    speed: float


def candidates(
    nodes: Sequence[NodeInfo], model: ModelSpec, fraction: float, kv_tokens: int
) -> list[Candidate]:
    def cap(node: NodeInfo, first: bool, last: bool) -> int:
        return layer_capacity(
            node,
            model,
            first=first,
            last=last,
            memory_fraction=fraction,
            kv_reserve_tokens=kv_tokens,
        )

    out = [
        Candidate(
            n,
            cap(n, False, False),
            cap(n, True, False),
            cap(n, False, True),
            cap(n, True, True),
            node_speed(n),
        )
        for n in nodes
    ]
    return sorted(
        (c for c in out if c.mid >= 1),
        key=lambda c: (
            -c.mid,
            -c.solo,
            -(c.first + c.last),
            -c.speed,
            c.node.joined_at,
            c.node.node_id,
        ),
    )


def best_roles(run: Sequence[Candidate]) -> tuple[int, int, int]:
    """(first index, last index, layers the run holds) for the best role choice; -1 if none."""
    if len(run) == 1:
        return 0, 0, run[0].solo if run[0].solo >= 1 else -1
    lose_first = [c.mid - c.first if c.first >= 1 else _INF for c in run]
    lose_last = [c.mid - c.last if c.last >= 1 else _INF for c in run]
    best = (_INF, 0, 0)
    for a in heapq.nsmallest(2, range(len(run)), key=lose_first.__getitem__):
        for b in heapq.nsmallest(2, range(len(run)), key=lose_last.__getitem__):
            if a != b and lose_first[a] + lose_last[b] < best[0]:
                best = (lose_first[a] + lose_last[b], a, b)
    if best[0] == _INF:
        return 0, 0, -1
    return best[1], best[2], int(sum(c.mid for c in run) - best[0])


def _holds(group: Sequence[Candidate], num_layers: int) -> bool:
    return len(group) <= num_layers and best_roles(group)[2] >= num_layers


def _finisher(
    group: list[Candidate], pool: list[Candidate], mids: list[int], num_layers: int
) -> int:
    """Index in ``pool`` (ascending by capacity) of the smallest node completing ``group``, else -1."""
    t = bisect.bisect_left(mids, num_layers - sum(c.mid for c in group))
    for _ in range(16):  # role losses make a few capacities just above the raw need fail
        if t >= len(pool):
            break
        if _holds([*group, pool[t]], num_layers):
            return t
        t = bisect.bisect_right(mids, mids[t])
    return -1


def greedy_groups(
    cands: list[Candidate], num_layers: int
) -> tuple[list[list[Candidate]], list[Candidate]]:
    """Complete node groups, formed one at a time until the pool cannot complete another, and
    the nodes left over.

    A group starts with the largest free node (alone if it holds the whole model) and grows by
    the smallest free node that completes it, or else by the largest free node: little capacity
    is wasted, so as many groups as possible form, and large nodes make short groups.
    """
    pool = cands[::-1]  # ascending
    mids = [c.mid for c in pool]
    groups = []
    while pool:
        group = [pool.pop()]
        mids.pop()
        while not _holds(group, num_layers):
            if not pool or len(group) >= num_layers:
                return groups, group + pool[::-1]
            t = _finisher(group, pool, mids, num_layers)
            group.append(pool.pop(t))
            mids.pop(t)
        groups.append(group)
    return groups, []


def choose_groups(groups: list[list[Candidate]]) -> list[list[Candidate]]:
    """The k shortest groups, for the k maximising k² / total stages (ties: more groups)."""
    by_length = sorted(groups, key=len)
    best_k, best_stages, stages = 0, 1, 0
    for k, group in enumerate(by_length, start=1):
        stages += len(group)
        if k * k * best_stages >= best_k * best_k * stages:
            best_k, best_stages = k, stages
    chosen = {id(g) for g in by_length[:best_k]}
    return [g for g in groups if id(g) in chosen]


def build_pipeline(
    run: Sequence[Candidate], num_layers: int, network: Network | None = None
) -> tuple[Stage, ...]:
    """Order a complete run (first/last by role capacity; with a network, each middle hop to
    the nearest remaining node) and water-fill its layers."""
    a, b, _ = best_roles(run)
    if len(run) == 1:
        order, caps = [run[0]], [run[0].solo]
    else:
        middle = [c for k, c in enumerate(run) if k not in (a, b)]
        if network is not None:
            middle = _nearest_chain(run[a], middle, network)
        order = [run[a], *middle, run[b]]
        caps = [run[a].first, *(c.mid for c in middle), run[b].last]
    layers = water_fill(num_layers, [c.speed for c in order], caps)
    stages, start = [], 0
    for cand, count in zip(order, layers, strict=True):
        if count:  # run length ≤ num_layers and role capacities ≥ 1: never 0 in practice
            stages.append(Stage(cand.node.node_id, start, start + count))
            start += count
    return tuple(stages)


def _nearest_chain(
    start: Candidate, rest: list[Candidate], network: Network
) -> list[Candidate]:
    chain, here, left = [], start, list(rest)
    while left:
        here = min(left, key=lambda c: network(here.node.node_id, c.node.node_id).rtt_ms)
        left.remove(here)
        chain.append(here)
    return chain


def hop_cost_ms(
    pipeline: Sequence[Stage], network: Network | None, activation_bytes: int = 0
) -> float:
    """Σ over a pipeline's hops of one-way latency (+ activation transfer on forward hops)."""
    if network is None or len(pipeline) < 2:
        return 0.0
    forward = sum(
        network(x.node_id, y.node_id).hop_ms(activation_bytes)
        for x, y in zip(pipeline, pipeline[1:], strict=False)
    )
    return forward + network(pipeline[-1].node_id, pipeline[0].node_id).hop_ms()


def planned_cost_ms(
    pipeline: Sequence[Stage],
    nodes: dict[str, NodeInfo],
    model: ModelSpec,
    network: Network | None = None,
) -> float:
    """Per-token cost of a pipeline as allocation sees it: stage compute from each node's
    roofline speed (:func:`node_speed`) plus its hops (:mod:`parallax.scheduler.cost`)."""
    compute = [
        s.num_layers
        * layer_latency_ms(layer_bytes=model.layer_bytes, speed_gbps=node_speed(nodes[s.node_id]))
        for s in pipeline
    ]
    net = network or (lambda _a, _b: LOOPBACK)
    links = [net(x.node_id, y.node_id) for x, y in zip(pipeline, pipeline[1:], strict=False)]
    back = net(pipeline[-1].node_id, pipeline[0].node_id) if len(pipeline) > 1 else None
    return pipeline_token_cost_ms(compute, links, back, model.activation_bytes)


def _regions(cands: list[Candidate], network: Network) -> list[list[Candidate]]:
    """Leader clustering: the largest unplaced node and every unplaced node near it."""
    left, regions = list(cands), []
    while left:
        leader = left[0].node.node_id
        near = [
            c
            for c in left
            if c.node.node_id == leader or network(leader, c.node.node_id).rtt_ms <= NEAR_RTT_MS
        ]
        taken = {id(c) for c in near}
        left = [c for c in left if id(c) not in taken]
        regions.append(near)
    return regions


def _speed_tiers(cands: list[Candidate]) -> list[list[Candidate]]:
    """Runs of similar speed: sorted by speed, cut where one is SPEED_TIER_GAP × the next.
    A pipeline of equally fast nodes water-fills evenly; a fast node tied to a slow one whose
    memory forces it to take many layers waits on it."""
    ordered = sorted(cands, key=lambda c: -c.speed)
    tiers: list[list[Candidate]] = []
    for c in ordered:
        if tiers and tiers[-1][-1].speed <= SPEED_TIER_GAP * c.speed:
            tiers[-1].append(c)
        else:
            tiers.append([c])
    return tiers


def network_groups(
    cands: list[Candidate], model: ModelSpec, network: Network
) -> list[tuple[Stage, ...]]:
    """Regional pipelines, then cross-region ones that cost at most FAR_COST_FACTOR × the
    regional median (module docstring)."""
    rank = {id(c): k for k, c in enumerate(cands)}

    def in_order(group: list[Candidate]) -> list[Candidate]:
        return sorted(group, key=lambda c: rank[id(c)])  # capacity order, for the greedy

    local, leftover = [], []
    for region in _regions(cands, network):
        mixed = []
        for tier in _speed_tiers(region):
            groups, rest = greedy_groups(in_order(tier), model.num_layers)
            local.extend(groups)
            mixed.extend(rest)
        groups, rest = greedy_groups(in_order(mixed), model.num_layers)
        local.extend(groups)
        leftover.extend(rest)
    far, _ = greedy_groups(in_order(leftover), model.num_layers)
    nodes = {c.node.node_id: c.node for c in cands}
    chosen = [build_pipeline(g, model.num_layers, network) for g in local]
    far_built = [build_pipeline(g, model.num_layers, network) for g in far]
    if not chosen:
        return [build_pipeline(g, model.num_layers, network) for g in choose_groups(far)]
    median = statistics.median(planned_cost_ms(p, nodes, model, network) for p in chosen)
    limit = FAR_COST_FACTOR * median
    return chosen + [p for p in far_built if planned_cost_ms(p, nodes, model, network) <= limit]
