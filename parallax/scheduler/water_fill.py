"""Water-filling: how many of a pipeline's layers each of its nodes gets. Pure functions.

Each node takes layers in proportion to its speed, up to its memory capacity, so every stage
finishes its share of a token at about the same time. Layers are whole, so the split is the
integer one whose slowest stage is fastest (max over splits of min speed ÷ layers): a pipeline
emits tokens at its bottleneck stage's pace.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def water_fill(num_layers: int, speeds: Sequence[float], capacities: Sequence[int]) -> list[int]:
    """Split ``num_layers`` over nodes in proportion to ``speeds``, never above ``capacities``.

    Hands out layers one at a time, each to the node that stays fastest per layer after taking
    it (largest ``speed / (layers + 1)`` with room left; ties: the lower index): the slowest
    stage is then as fast as any integer split allows (and so on for the next slowest), then
    gives every node with capacity ≥ 1 at least one layer (taken from the node with the most
    layers per speed) when ``num_layers`` allows. A node can still get 0 (capacity 0, or more
    nodes than layers): callers drop it from the pipeline. Non-positive speeds count as far
    slower than any positive one. Raises ValueError if ``sum(capacities) < num_layers``.
    """
    if len(speeds) != len(capacities):
        raise ValueError("speeds and capacities differ in length")
    if num_layers < 0 or any(c < 0 for c in capacities):
        raise ValueError("layer counts and capacities cannot be negative")
    if sum(capacities) < num_layers:
        raise ValueError(f"capacities hold {sum(capacities)} layers, {num_layers} needed")
    rates = _effective_speeds(speeds)
    # a layer whose pace speed / k beats the even pace Σ speed / num_layers is handed out in
    # any case (the last layer handed out paces at most that): start there, hand out the rest
    even = sum(rates) / max(1, num_layers)
    layers = [min(c, max(0, math.ceil(r / even) - 1)) for r, c in
              zip(rates, capacities, strict=True)]
    heap = [(-r / (n + 1), i) for i, (r, c, n) in
            enumerate(zip(rates, capacities, layers, strict=True)) if n < c]
    heapq.heapify(heap)
    for _ in range(num_layers - sum(layers)):
        _, i = heapq.heappop(heap)
        layers[i] += 1
        if layers[i] < capacities[i]:
            heapq.heappush(heap, (-rates[i] / (layers[i] + 1), i))
    return _at_least_one_each(layers, capacities, rates)


def bottleneck_rate(layers: Sequence[int], speeds: Sequence[float]) -> float:
    """min over stages holding layers of speed ÷ layers: the pace (in speed units per layer)
    the slowest stage sets; 0 when no stage holds a layer."""
    paces = [s / n for n, s in zip(layers, speeds, strict=True) if n > 0]
    return min(paces) if paces else 0.0


def _effective_speeds(speeds: Sequence[float]) -> list[float]:
    positive = [s for s in speeds if s > 0]
    if not positive:
        return [1.0] * len(speeds)
    floor = min(positive) * 1e-3
    return [s if s > 0 else floor for s in speeds]


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
