"""Water-filling: how many of a pipeline's layers each of its nodes gets. Pure functions.

Each node takes layers in proportion to its speed, up to its memory capacity, so every stage
finishes its share of a token at about the same time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_INF = math.inf


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
