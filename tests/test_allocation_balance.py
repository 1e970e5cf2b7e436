"""Allocation uses the swarm's capacity: max-min layer splits, speed-aware grouping of mixed
nodes, spare nodes given layers, slow groups dissolved. Pure functions, no sockets."""

from __future__ import annotations

import itertools
import random

from test_allocation import check_valid, node, spec

from parallax.scheduler.allocation import NodeInfo, allocate, node_speed, water_fill
from parallax.scheduler.cost import Link
from parallax.scheduler.grouping import candidates, dissolve_slow_groups

FRACTION, KV_TOKENS = 0.85, 4096


def one_region(_a: str, _b: str) -> Link:
    return Link(2.0, 1000.0)


def pace(layers: list[int], speeds: list[float]) -> float:
    """The slowest stage's speed per layer (what a pipeline's throughput is proportional to)."""
    return min(s / n for n, s in zip(layers, speeds, strict=True) if n > 0)


def pipeline_paces(alloc, nodes: list[NodeInfo]) -> list[float]:
    speed = {n.node_id: node_speed(n) for n in nodes}
    return [min(speed[s.node_id] / s.num_layers for s in p) for p in alloc.pipelines]


def test_water_fill_finds_the_best_bottleneck_of_any_integer_split() -> None:
    # largest-remainder rounding of 7 × (10, 3) / 13 gives [5, 2]: the slow node paces 1.5
    assert water_fill(7, [10.0, 3.0], [25, 25]) == [6, 1]
    rng = random.Random(3)
    for _ in range(300):
        n = rng.randint(2, 4)
        caps = [rng.randint(1, 9) for _ in range(n)]
        speeds = [rng.choice([1.0, 2.0, 3.0, 5.0, 10.0]) * rng.uniform(0.95, 1.05) for _ in caps]
        total = rng.randint(n, sum(caps))
        got = water_fill(total, speeds, caps)
        best = max(
            pace(list(split), speeds)
            for split in itertools.product(*(range(1, c + 1) for c in caps))
            if sum(split) == total
        )
        assert sum(got) == total and all(1 <= g <= c for g, c in zip(got, caps, strict=True))
        assert pace(got, speeds) >= best * (1 - 1e-12), (total, speeds, caps, got)


def test_a_fast_node_is_not_tied_to_a_slow_one_that_must_take_many_layers() -> None:
    model = spec(32, embedding=0, lm_head=0)
    # one fast node with little memory, three mid-speed ones, two slow ones with much memory:
    # the capacity greedy pairs fast (20) with slow (13), which must then run 12 layers
    nodes = [node("fast", 20, speed=10), node("slow1", 13, speed=1), node("slow2", 13, speed=1),
             *(node(f"mid{k}", 10, speed=3.6) for k in range(3))]
    alloc = allocate(nodes, model, network=one_region)
    check_valid(alloc, nodes, model)
    (fast_pipeline,) = [p for p in alloc.pipelines if any(s.node_id == "fast" for s in p)]
    speed = {n.node_id: node_speed(n) for n in nodes}
    assert min(speed[s.node_id] / s.num_layers for s in fast_pipeline) > 0.3 * speed["fast"] / 20


def test_a_spare_node_takes_layers_where_it_raises_the_bottleneck() -> None:
    model = spec(32, embedding=0, lm_head=0)
    # three equal nodes hold 11 + 11 + 10 layers; a half-as-fast node alone holds no pipeline
    nodes = [node("a", 13, speed=10), node("b", 13, speed=10), node("c", 13, speed=10),
             node("half", 10, speed=5)]
    alloc = allocate(nodes, model, network=one_region)
    check_valid(alloc, nodes, model)
    assert alloc.unassigned == () and alloc.stage_of("half") is not None
    (paced,) = pipeline_paces(alloc, nodes)
    assert paced > node_speed(nodes[0]) / 11  # faster than the three alone


def test_a_node_that_adds_nothing_stays_standby() -> None:
    model = spec(32, embedding=0, lm_head=0)
    # two nodes hold 16 + 16 at equal pace; a very slow one could only slow them down
    nodes = [node("a", 17, speed=10), node("b", 17, speed=10), node("crawl", 10, speed=0.1)]
    alloc = allocate(nodes, model, network=one_region)
    assert alloc.unassigned == ("crawl",)


def test_a_far_spare_node_is_not_attached() -> None:
    model = spec(32, embedding=0, lm_head=0)
    nodes = [node("a", 13, speed=10), node("b", 13, speed=10), node("c", 13, speed=10),
             node("far", 10, speed=5)]

    def net(a: str, b: str) -> Link:
        return Link(150.0 if "far" in (a, b) and a != b else 2.0)

    assert allocate(nodes, model, network=net).unassigned == ("far",)


def test_a_slow_group_dissolves_when_its_nodes_do_more_elsewhere() -> None:
    model = spec(32, embedding=0, lm_head=0)
    nodes = [node("a", 13, speed=10), node("b", 13, speed=10), node("c", 13, speed=10),
             node("f", 20, speed=10), node("s", 20, speed=0.5)]
    by_id = {c.node.node_id: c for c in candidates(nodes, model, FRACTION, KV_TOKENS)}
    fast = [by_id["a"], by_id["b"], by_id["c"]]
    slow = [by_id["f"], by_id["s"]]  # s must run 12 layers: the pair runs at its pace
    kept = dissolve_slow_groups([fast, slow], 32)
    assert len(kept) == 1 and {c.node.node_id for c in kept[0]} >= {"a", "b", "c", "f"}
    # a group running near its ideal pace is never dissolved
    alone = [by_id["a"], by_id["b"], by_id["c"]]
    assert dissolve_slow_groups([alone], 32) == [[by_id["a"], by_id["b"], by_id["c"]]]


def layers_loaded(before, after) -> int:
    """Layers nodes must load: those of their new range they did not hold before."""
    held = {s.node_id: (s.start_layer, s.end_layer) for p in before.pipelines for s in p}
    total = 0
    for p in after.pipelines:
        for s in p:
            a, b = held.get(s.node_id, (0, 0))
            total += s.num_layers - max(0, min(b, s.end_layer) - max(a, s.start_layer))
    return total


def test_a_broken_pipeline_is_resplit_around_its_survivors() -> None:
    from parallax.scheduler.rebalance import rebalance

    model = spec(32, embedding=0, lm_head=0)
    a, b, c = node("a", 12), node("b", 12), node("c", 12)
    first = allocate([a, b, c], model, network=one_region)
    (pipeline,) = first.pipelines
    lost = pipeline[0]  # the head leaves; no free node holds its range as is
    survivors = [n for n in (a, b, c) if n.node_id != lost.node_id]
    smaller = node("d", lost.num_layers - 1)
    after = rebalance(first, [*survivors, smaller], model, network=one_region)
    check_valid(after, [*survivors, smaller], model)
    (repaired,) = after.pipelines
    assert [s.node_id for s in repaired] == ["d", pipeline[1].node_id, pipeline[2].node_id]
    # the survivors keep their layers but one each: a fresh split of the three would move one
    # survivor's whole range
    assert layers_loaded(first, after) <= lost.num_layers + 2
