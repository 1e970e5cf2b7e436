"""Request routing: pipelines + load + latency → one pipeline, "all_busy" or "no_pipeline". Pure.

Cache-aware routing: a chat sends its whole history every turn, and the pipeline that served
the previous turn holds that history's KV in its prefix caches. :func:`conversation_keys` names
every leading run of a chat's messages; the scheduler remembers the key of each request it
placed (parallax/scheduler/affinity.py) and passes the pipeline of the longest remembered one
as ``preferred``: :func:`route` takes it unless its cost exceeds the best pipeline's by more
than ``AFFINITY_COST_RATIO`` (much busier), where recomputing the prefix elsewhere is cheaper.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from parallax.scheduler.allocation import Stage
from parallax.scheduler.cost import DEFAULT_LAYER_LATENCY_MS, token_cost_ms

_TIE = 1e-9
AFFINITY_COST_RATIO = 1.5
"""The pipeline holding a conversation's prefix wins while its cost is at most this × the best
one's: with equal speeds, cost grows with load from 1× (idle) to 2× (full), so it keeps the
conversation until it is about half full more than the idlest pipeline."""


@dataclass(frozen=True)
class NodeLoad:
    """A node's load as its last heartbeat reported it."""

    node_id: str
    running_requests: int
    waiting_requests: int
    max_running_requests: int
    layer_latency_ms: float
    """Per-layer forward latency, EWMA; 0 when not measured yet."""
    alive: bool = True

    @property
    def at_capacity(self) -> bool:
        """No room for another request (running + waiting ≥ max running)."""
        return self.running_requests + self.waiting_requests >= self.max_running_requests

    @property
    def load_factor(self) -> float:
        """(running + waiting) / max running: 0 when idle, 1 when full."""
        if self.max_running_requests <= 0:
            return 1.0
        return (self.running_requests + self.waiting_requests) / self.max_running_requests


@dataclass(frozen=True)
class RouteDecision:
    """Which pipeline serves the request; ``pipeline_index`` is None unless ``reason`` is "ok"."""

    pipeline_index: int | None
    reason: Literal["ok", "all_busy", "no_pipeline"]
    cost_ms: float | None = None


def _default_latency(loads: Mapping[str, NodeLoad]) -> float:
    known = [load.layer_latency_ms for load in loads.values() if load.layer_latency_ms > 0]
    return sum(known) / len(known) if known else DEFAULT_LAYER_LATENCY_MS


def _hop(links: Mapping[tuple[str, str], float], a: str, b: str) -> float:
    return links.get((a, b), links.get((b, a), 0.0))


def pipeline_cost_ms(
    pipeline: Sequence[Stage],
    loads: Mapping[str, NodeLoad],
    link_latency_ms: Mapping[tuple[str, str], float] | None = None,
    default_layer_latency_ms: float = DEFAULT_LAYER_LATENCY_MS,
) -> float:
    """Estimated cost of one token: Σ layers × layer latency × (1 + load factor) + link latencies.

    The per-token cost model (:func:`parallax.scheduler.cost.token_cost_ms`) with each stage's
    compute stretched by its load. ``link_latency_ms`` holds one-way hop costs (transfer
    included); the hops are those between consecutive stages plus the token's way back from the
    last stage to the head; a link missing from it (either direction) counts as 0. A node with
    no measured latency uses ``default_layer_latency_ms``.
    """
    links = link_latency_ms or {}
    compute = []
    for stage in pipeline:
        load = loads[stage.node_id]
        per_layer = load.layer_latency_ms if load.layer_latency_ms > 0 else default_layer_latency_ms
        compute.append(stage.num_layers * per_layer * (1.0 + load.load_factor))
    hops = []
    if links and len(pipeline) > 1:
        ids = [s.node_id for s in pipeline]
        hops = [_hop(links, a, b) for a, b in zip(ids, ids[1:] + ids[:1], strict=True)]
    return token_cost_ms(compute, hops)


def conversation_keys(messages: Any) -> list[str]:
    """Chained digests of a chat's leading messages: ``keys[k]`` names ``messages[:k + 1]``
    (role and content; equal keys mean equal histories). Not a list of messages: []."""
    if not isinstance(messages, list):
        return []
    keys, digest = [], b""
    for message in messages:
        if not isinstance(message, dict):
            break
        part = msgspec.json.encode([message.get("role"), message.get("content")],
                                   order="sorted")
        digest = hashlib.blake2b(digest + part, digest_size=16).digest()
        keys.append(digest.hex())
    return keys


def route(
    pipelines: Sequence[Sequence[Stage]],
    loads: Mapping[str, NodeLoad],
    *,
    link_latency_ms: Mapping[tuple[str, str], float] | None = None,
    last_index: int = -1,
    preferred: int | None = None,
    affinity_cost_ratio: float = AFFINITY_COST_RATIO,
) -> RouteDecision:
    """Pick the pipeline for the next request.

    Pipelines with a node that is dead or missing from ``loads`` are skipped (none left:
    "no_pipeline"); so are pipelines with a node at capacity (all of the rest: "all_busy").
    Among the others the lowest :func:`pipeline_cost_ms` wins; equal costs go round-robin to the
    first index after ``last_index``, wrapping around. ``preferred`` (the pipeline that holds
    the request's prefix) wins instead when it is free and its cost is at most
    ``affinity_cost_ratio`` × the lowest.
    """
    complete = [
        i
        for i, p in enumerate(pipelines)
        if p and all(s.node_id in loads and loads[s.node_id].alive for s in p)
    ]
    if not complete:
        return RouteDecision(None, "no_pipeline")
    free = [i for i in complete if not any(loads[s.node_id].at_capacity for s in pipelines[i])]
    if not free:
        return RouteDecision(None, "all_busy")
    default = _default_latency(loads)
    costs = {i: pipeline_cost_ms(pipelines[i], loads, link_latency_ms, default) for i in free}
    best = min(costs.values())
    if preferred in costs and costs[preferred] <= best * affinity_cost_ratio + _TIE:
        return RouteDecision(preferred, "ok", costs[preferred])
    tied = [i for i in free if costs[i] <= best + _TIE * max(1.0, abs(best))]
    pick = min(tied, key=lambda i: (i <= last_index, i))
    return RouteDecision(pick, "ok", costs[pick])
