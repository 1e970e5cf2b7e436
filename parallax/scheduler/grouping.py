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
from parallax.scheduler.water_fill import bottleneck_rate, water_fill

NEAR_RTT_MS = 20.0
"""Nodes within this RTT of a region's leader belong to its region."""
FAR_COST_FACTOR = 2.0
"""A cross-region pipeline is used only when it costs at most this × the regional median."""
SPEED_TIER_GAP = 1.5
"""Within a region, pipelines form first among nodes whose speeds differ less than this."""
ATTACH_MAX_STAGES = 6
"""A spare node joins a near pipeline as an extra stage only while that pipeline has fewer
stages: each stage adds a hop, and a long pipeline needs many requests in flight to keep every
stage busy."""
ATTACH_MIN_GAIN = 0.25
"""... and only when the pipeline gains at least this share of the node's own fair share."""
DISSOLVE_EFFICIENCY = 0.8
"""A group paced below this share of its ideal is dissolved when its nodes, attached to other
groups, add more than it gives."""

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
    order = _role_order(run)
    if network is not None and len(order) > 2:
        order = [order[0], *_nearest_chain(order[0], order[1:-1], network), order[-1]]
    return _stages(order, water_fill(num_layers, [c.speed for c in order], _role_caps(order)))


def split_in_order(run: Sequence[Candidate], num_layers: int) -> tuple[Stage, ...] | None:
    """``run`` in this order (first and last in their roles) water-filled; None when it cannot
    hold ``num_layers`` (or a node would get no layer)."""
    caps = _role_caps(run)
    if len(run) > num_layers or sum(caps) < num_layers or min(caps) < 1:
        return None
    return _stages(run, water_fill(num_layers, [c.speed for c in run], caps))


def _role_order(run: Sequence[Candidate]) -> list[Candidate]:
    """The run with its best first node first and its best last node last (best_roles)."""
    if len(run) == 1:
        return [run[0]]
    a, b, _ = best_roles(run)
    return [run[a], *(c for k, c in enumerate(run) if k not in (a, b)), run[b]]


def _stages(order: Sequence[Candidate], layers: Sequence[int]) -> tuple[Stage, ...]:
    """Consecutive half-open ranges of ``layers`` each; a node given none is left out (run
    length ≤ num_layers and role capacities ≥ 1: never in practice)."""
    stages, start = [], 0
    for cand, count in zip(order, layers, strict=True):
        if count:
            stages.append(Stage(cand.node.node_id, start, start + count))
            start += count
    return tuple(stages)


def _role_caps(order: Sequence[Candidate]) -> list[int]:
    if len(order) == 1:
        return [order[0].solo]
    return [order[0].first, *(c.mid for c in order[1:-1]), order[-1].last]


def group_pace(run: Sequence[Candidate], num_layers: int) -> float:
    """The pace (reported speed ÷ layers) of the slowest stage of the pipeline
    :func:`build_pipeline` makes of ``run``; 0 when ``run`` cannot hold ``num_layers``.

    A pipeline emits tokens at its slowest stage's pace, so this is its decode throughput up to
    a constant; the ideal is ``Σ speed ÷ num_layers`` (every stage equally busy)."""
    if not _holds(run, num_layers):
        return 0.0
    order = _role_order(run)
    speeds = [c.speed for c in order]
    return bottleneck_rate(water_fill(num_layers, speeds, _role_caps(order)), speeds)


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
    regional median, then spare nodes attached to near pipelines (module docstring)."""
    rank = {id(c): k for k, c in enumerate(cands)}
    num_layers = model.num_layers

    def in_order(group: list[Candidate]) -> list[Candidate]:
        return sorted(group, key=lambda c: rank[id(c)])  # capacity order, for the greedy

    local, leftover = [], []
    for region in _regions(cands, network):
        mixed = []
        for tier in _speed_tiers(region):
            groups, rest = greedy_groups(in_order(tier), num_layers)
            local.extend(groups)
            mixed.extend(rest)
        groups, rest = _mixed_groups(in_order(mixed), num_layers)
        local.extend(groups)
        leftover.extend(rest)
    far, _ = greedy_groups(in_order(leftover), num_layers)
    nodes = {c.node.node_id: c.node for c in cands}
    built: dict[tuple[str, ...], tuple[Stage, ...]] = {}

    def build(group: list[Candidate]) -> tuple[Stage, ...]:  # each group once
        key = tuple(c.node.node_id for c in group)
        if key not in built:
            built[key] = build_pipeline(group, num_layers, network)
        return built[key]

    if not local:
        local = choose_groups(far)
    elif far:
        median = statistics.median(planned_cost_ms(build(g), nodes, model, network) for g in local)
        limit = FAR_COST_FACTOR * median
        local.extend(
            g for g in far if planned_cost_ms(build(g), nodes, model, network) <= limit
        )
    used = {id(c) for g in local for c in g}
    attach_spare(local, [c for c in cands if id(c) not in used], num_layers, network)
    local = dissolve_slow_groups(local, num_layers, network)
    return [build(g) for g in local]


def dissolve_slow_groups(
    groups: list[list[Candidate]], num_layers: int, network: Network | None = None
) -> list[list[Candidate]]:
    """Groups that run below DISSOLVE_EFFICIENCY of their ideal pace (Σ speed ÷ num_layers),
    slowest first, are dissolved when attaching their nodes to the other groups
    (:func:`attach_spare`) gives a larger total pace; returns the groups kept (those that took
    nodes grew in place)."""
    paces = [group_pace(g, num_layers) for g in groups]
    ideal = [sum(c.speed for c in g) / num_layers for g in groups]
    slow = sorted(
        (k for k in range(len(groups)) if paces[k] < DISSOLVE_EFFICIENCY * ideal[k]),
        key=lambda k: paces[k] / max(1e-12, ideal[k]),
    )
    for target in [groups[k] for k in slow]:
        at = next((k for k, g in enumerate(groups) if g is target), -1)
        if at < 0 or len(groups) < 2:
            continue
        trial = [g for k, g in enumerate(groups) if k != at]
        trial_paces = [p for k, p in enumerate(paces) if k != at]
        sizes = [len(g) for g in trial]
        attach_spare(trial, target, num_layers, network, trial_paces)
        if sum(trial_paces) > sum(paces):
            groups, paces = trial, trial_paces
        else:  # attach_spare only appends: undo it
            for g, n in zip(trial, sizes, strict=True):
                del g[n:]
    return groups


def _speed_runs(
    cands: list[Candidate], num_layers: int
) -> tuple[list[list[Candidate]], list[Candidate]]:
    """Groups of consecutive speed: the fastest free nodes until they hold the model, and so on;
    the slowest nodes that complete no group are left over."""
    groups: list[list[Candidate]] = []
    group: list[Candidate] = []
    for c in sorted(cands, key=lambda c: -c.speed):
        group.append(c)
        if _holds(group, num_layers):
            groups.append(group)
            group = []
    return groups, group


def _mixed_groups(
    cands: list[Candidate], num_layers: int
) -> tuple[list[list[Candidate]], list[Candidate]]:
    """A region's nodes of mixed speeds: the capacity greedy (:func:`greedy_groups`) or runs of
    consecutive speed (:func:`_speed_runs`), whichever gives the larger total pace. The greedy
    alone ties a fast node with little memory to a slow one that must then take many layers
    (an M2 laptop holding 20 layers next to an RTX 4090): the pipeline runs at the laptop's
    pace."""
    options = [greedy_groups(cands, num_layers), _speed_runs(cands, num_layers)]
    return max(options, key=lambda o: sum(group_pace(g, num_layers) for g in o[0]))


def attach_spare(
    groups: list[list[Candidate]],
    spare: Sequence[Candidate],
    num_layers: int,
    network: Network | None = None,
    paces: list[float] | None = None,
) -> list[Candidate]:
    """Give spare nodes layers: each (fastest first) joins the group, near it (first member
    within NEAR_RTT_MS) and shorter than ATTACH_MAX_STAGES, whose pace (:func:`group_pace`) it
    raises most, if that gain is at least ATTACH_MIN_GAIN of the node's own fair share
    (speed ÷ num_layers). ``groups`` grow in place (and ``paces``, their paces if given, with
    them); returns the nodes left spare (standby).

    A fast node capped by memory leaves pace on the table that a slow node with a few layers
    takes up; a node that would only add a hop for nothing stays standby for repairs."""
    if paces is None:
        paces = [group_pace(g, num_layers) for g in groups]
    left = []
    for cand in sorted(spare, key=lambda c: (-c.speed, c.node.joined_at, c.node.node_id)):
        best, best_pace, best_gain = -1, 0.0, ATTACH_MIN_GAIN * cand.speed / num_layers
        for k, group in enumerate(groups):
            if len(group) >= ATTACH_MAX_STAGES or (
                network is not None
                and network(group[0].node.node_id, cand.node.node_id).rtt_ms > NEAR_RTT_MS
            ):
                continue
            pace = group_pace([*group, cand], num_layers)
            if pace - paces[k] >= best_gain:
                best, best_pace, best_gain = k, pace, pace - paces[k]
        if best < 0:
            left.append(cand)
        else:
            groups[best].append(cand)
            paces[best] = best_pace
    return left
