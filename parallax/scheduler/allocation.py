"""Layer allocation: which node holds which decoder layers. Pure functions over plain data.

- :func:`layer_capacity`: memory decides how many layers fit on a node in a given role (the first
  stage also holds the embedding, the last one the final norm + LM head).
- :func:`water_fill`: speed decides how many layers each node of one pipeline gets.
- :func:`allocate`: picks node-disjoint pipelines, each covering ``[0, num_layers)``.
- :func:`rebalance`: after a join or a leave, keeps every pipeline that is still valid.

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
median: a far node stays standby when near ones can do the job. Stages are ordered so each hop
goes to the nearest remaining node. :func:`rebalance` re-plans a pipeline whose hops got
:data:`DEGRADED_FACTOR` times slower than when it was planned (and at least
:data:`DEGRADED_MIN_MS` slower).

Layer ranges are half-open ``[start_layer, end_layer)`` everywhere.
"""

from __future__ import annotations

import bisect
import heapq
import math
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from parallax.scheduler.cost import LOOPBACK, Link, layer_latency_ms, pipeline_token_cost_ms

DEFAULT_MEMORY_FRACTION = 0.85
"""Share of a node's reported memory that allocation may plan with (rest: activations, runtime)."""
DEFAULT_KV_RESERVE_TOKENS = 4096
"""Every layer a node takes must come with KV-cache room for at least this many tokens."""
DECODE_INTENSITY = 8.0
"""FLOPs per weight byte assumed by :func:`node_speed` (≈ a decode batch of 8 on 16-bit weights)."""

NEAR_RTT_MS = 20.0
"""Nodes within this RTT of a region's leader belong to its region."""
FAR_COST_FACTOR = 2.0
"""A cross-region pipeline is used only when it costs at most this × the regional median."""
SPEED_TIER_GAP = 1.5
"""Within a region, pipelines form first among nodes whose speeds differ less than this."""
DEGRADED_FACTOR = 2.0
DEGRADED_MIN_MS = 20.0
REPLAN_MIN_GAIN = 0.25
"""A re-plan for degraded links must cut the mean per-token cost by this share (and by at least
DEGRADED_MIN_MS): a serving pipeline moves only for a clear gain."""

_INF = math.inf

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


# ---------------------------------------------------------------------------------------------
# water-filling


def water_fill(num_layers: int, speeds: Sequence[float], capacities: Sequence[int]) -> list[int]:
    """Split ``num_layers`` over nodes in proportion to ``speeds``, never above ``capacities``.

    Finds λ with ``Σ min(capacity, λ·speed) = num_layers`` by binary search, rounds by largest
    remainder, then gives every node with capacity ≥ 1 at least one layer (taken from the node
    with the most layers per speed) when ``num_layers`` allows. A node can still get 0 (capacity
    0, or more nodes than layers): callers drop it from the pipeline. Non-positive speeds count
    as far slower than any positive one. Raises ValueError if ``sum(capacities) < num_layers``.
    """
    if len(speeds) != len(capacities):
        raise ValueError("speeds and capacities differ in length")
    if num_layers < 0 or any(c < 0 for c in capacities):
        raise ValueError("layer counts and capacities cannot be negative")
    if sum(capacities) < num_layers:
        raise ValueError(f"capacities hold {sum(capacities)} layers, {num_layers} needed")
    if num_layers == 0:
        return [0] * len(capacities)
    rates = _effective_speeds(speeds)
    lam = _solve_lambda(num_layers, rates, capacities)
    shares = [min(float(c), lam * r) for c, r in zip(capacities, rates, strict=True)]
    layers = _round_largest_remainder(num_layers, shares, capacities, rates)
    return _at_least_one_each(layers, capacities, rates)


def _effective_speeds(speeds: Sequence[float]) -> list[float]:
    positive = [s for s in speeds if s > 0]
    if not positive:
        return [1.0] * len(speeds)
    floor = min(positive) * 1e-3
    return [s if s > 0 else floor for s in speeds]


def _solve_lambda(total: int, rates: list[float], capacities: Sequence[int]) -> float:
    """Smallest λ (to float precision) with Σ min(cap, λ·rate) ≥ total."""
    lo, hi = 0.0, max(c / r for c, r in zip(capacities, rates, strict=True))
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        filled = sum(min(c, mid * r) for c, r in zip(capacities, rates, strict=True))
        if filled >= total:
            hi = mid
        else:
            lo = mid
    return hi


def _round_largest_remainder(
    total: int, shares: list[float], capacities: Sequence[int], rates: list[float]
) -> list[int]:
    layers = [min(int(math.floor(s)), c) for s, c in zip(shares, capacities, strict=True)]
    order = sorted(range(len(shares)), key=lambda i: (layers[i] - shares[i], -rates[i], i))
    remaining = total - sum(layers)
    while remaining > 0:  # one pass suffices unless float error left more than n behind
        for i in order:
            if remaining and layers[i] < capacities[i]:
                layers[i] += 1
                remaining -= 1
    return layers


def _at_least_one_each(
    layers: list[int], capacities: Sequence[int], rates: list[float]
) -> list[int]:
    eligible = [i for i, c in enumerate(capacities) if c >= 1]
    if sum(layers) < len(eligible):
        return layers
    for i in eligible:
        if layers[i] == 0:
            donor = max(
                (d for d in range(len(layers)) if layers[d] > 1),
                key=lambda d: (layers[d] / rates[d], -d),
            )
            layers[donor] -= 1
            layers[i] = 1
    return layers


# ---------------------------------------------------------------------------------------------
# choosing pipelines


@dataclass(frozen=True)
class _Candidate:
    node: NodeInfo
    mid: int  # capacity as a middle stage
    first: int
    last: int
    solo: int  # first and last at once
    speed: float


def _candidates(
    nodes: Sequence[NodeInfo], model: ModelSpec, fraction: float, kv_tokens: int
) -> list[_Candidate]:
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
        _Candidate(
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


def _best_roles(run: Sequence[_Candidate]) -> tuple[int, int, int]:
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


def _holds(group: Sequence[_Candidate], num_layers: int) -> bool:
    return len(group) <= num_layers and _best_roles(group)[2] >= num_layers


def _finisher(
    group: list[_Candidate], pool: list[_Candidate], mids: list[int], num_layers: int
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


def _greedy_groups(
    cands: list[_Candidate], num_layers: int
) -> tuple[list[list[_Candidate]], list[_Candidate]]:
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


def _choose_groups(groups: list[list[_Candidate]]) -> list[list[_Candidate]]:
    """The k shortest groups, for the k maximising k² / total stages (ties: more groups)."""
    by_length = sorted(groups, key=len)
    best_k, best_stages, stages = 0, 1, 0
    for k, group in enumerate(by_length, start=1):
        stages += len(group)
        if k * k * best_stages >= best_k * best_k * stages:
            best_k, best_stages = k, stages
    chosen = {id(g) for g in by_length[:best_k]}
    return [g for g in groups if id(g) in chosen]


def _build_pipeline(
    run: Sequence[_Candidate], num_layers: int, network: Network | None = None
) -> tuple[Stage, ...]:
    """Order a complete run (first/last by role capacity; with a network, each middle hop to
    the nearest remaining node) and water-fill its layers."""
    a, b, _ = _best_roles(run)
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
    start: _Candidate, rest: list[_Candidate], network: Network
) -> list[_Candidate]:
    chain, here, left = [], start, list(rest)
    while left:
        here = min(left, key=lambda c: network(here.node.node_id, c.node.node_id).rtt_ms)
        left.remove(here)
        chain.append(here)
    return chain


# ---------------------------------------------------------------------------------------------
# network


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


def _regions(cands: list[_Candidate], network: Network) -> list[list[_Candidate]]:
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


def _speed_tiers(cands: list[_Candidate]) -> list[list[_Candidate]]:
    """Runs of similar speed: sorted by speed, cut where one is SPEED_TIER_GAP × the next.
    A pipeline of equally fast nodes water-fills evenly; a fast node tied to a slow one whose
    memory forces it to take many layers waits on it."""
    ordered = sorted(cands, key=lambda c: -c.speed)
    tiers: list[list[_Candidate]] = []
    for c in ordered:
        if tiers and tiers[-1][-1].speed <= SPEED_TIER_GAP * c.speed:
            tiers[-1].append(c)
        else:
            tiers.append([c])
    return tiers


def _network_groups(
    cands: list[_Candidate], model: ModelSpec, network: Network
) -> list[tuple[Stage, ...]]:
    """Regional pipelines, then cross-region ones that cost at most FAR_COST_FACTOR × the
    regional median (module docstring)."""
    rank = {id(c): k for k, c in enumerate(cands)}

    def in_order(group: list[_Candidate]) -> list[_Candidate]:
        return sorted(group, key=lambda c: rank[id(c)])  # capacity order, for the greedy

    local, leftover = [], []
    for region in _regions(cands, network):
        mixed = []
        for tier in _speed_tiers(region):
            groups, rest = _greedy_groups(in_order(tier), model.num_layers)
            local.extend(groups)
            mixed.extend(rest)
        groups, rest = _greedy_groups(in_order(mixed), model.num_layers)
        local.extend(groups)
        leftover.extend(rest)
    far, _ = _greedy_groups(in_order(leftover), model.num_layers)
    nodes = {c.node.node_id: c.node for c in cands}
    chosen = [_build_pipeline(g, model.num_layers, network) for g in local]
    far_built = [_build_pipeline(g, model.num_layers, network) for g in far]
    if not chosen:
        return [_build_pipeline(g, model.num_layers, network) for g in _choose_groups(far)]
    median = statistics.median(planned_cost_ms(p, nodes, model, network) for p in chosen)
    limit = FAR_COST_FACTOR * median
    return chosen + [p for p in far_built if planned_cost_ms(p, nodes, model, network) <= limit]


def _check_unique(nodes: Sequence[NodeInfo]) -> None:
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate node_id in nodes")


def _shortfall(
    cands: list[_Candidate],
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
    held = _best_roles(cands)[2]
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
    _check_unique(nodes)
    cands = _candidates(nodes, model, memory_fraction, kv_reserve_tokens)
    if network is None:
        groups = _choose_groups(_greedy_groups(cands, model.num_layers)[0])
        pipelines = tuple(_build_pipeline(g, model.num_layers) for g in groups)
    else:
        pipelines = tuple(_network_groups(cands, model, network))
    used = {s.node_id for p in pipelines for s in p}
    unassigned = tuple(n.node_id for n in _ordered(nodes) if n.node_id not in used)
    if not pipelines:
        per_layer = layer_bytes_with_kv(model, kv_reserve_tokens)
        reason = _shortfall(cands, nodes, model, per_layer, memory_fraction)
        return Allocation((), unassigned, True, reason)
    hops = tuple(hop_cost_ms(p, network, model.activation_bytes) for p in pipelines)
    return Allocation(pipelines, unassigned, False, _summary(pipelines, unassigned), hops)


def _ordered(nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
    return sorted(nodes, key=lambda n: (n.joined_at, n.node_id))


def _summary(pipelines: Sequence[Sequence[Stage]], unassigned: Sequence[str]) -> str:
    stages = sum(len(p) for p in pipelines)
    return f"{len(pipelines)} pipeline(s) over {stages} node(s), {len(unassigned)} unassigned"


# ---------------------------------------------------------------------------------------------
# rebalancing


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
) -> Allocation:
    """The allocation after nodes joined or left (or links changed), moving as few nodes as
    possible.

    A previous pipeline whose nodes are all present and still fit is kept exactly. One that lost
    nodes is repaired when free nodes (never assigned before) can take each lost range as is;
    otherwise it dissolves. Free nodes and survivors of dissolved pipelines are then allocated
    into new pipelines with :func:`allocate`; if no pipeline at all results, a full
    :func:`allocate` over every node decides.

    With a ``network``, pipelines whose hops became degraded (:func:`degraded_pipelines`) are
    re-planned too, but the re-plan is taken only when it lowers the mean per-token cost of the
    allocation's pipelines by :data:`REPLAN_MIN_GAIN` (and at least :data:`DEGRADED_MIN_MS`):
    otherwise they are kept, with
    their current hop cost as the new planned figure (so measurement noise on links that are
    all alike never moves a serving pipeline).
    """
    _check_unique(nodes)
    options = {"memory_fraction": memory_fraction, "kv_reserve_tokens": kv_reserve_tokens}
    by_id = {n.node_id: n for n in nodes}
    present = [
        i for i, p in enumerate(previous.pipelines) if all(s.node_id in by_id for s in p)
    ]
    degraded = set(degraded_pipelines(previous, model, network, present))
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
    pool = [n for n in _ordered(nodes) if n.node_id not in before]
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
        _summary(pipelines, fresh.unassigned),
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
        _summary(pipelines, unassigned),
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
