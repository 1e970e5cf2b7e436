"""The cost of one generated token on a pipeline: compute plus network. Pure functions.

One decode step of a request walks every stage in order and comes back to the head with the
sampled token, so a pipeline's per-token cost is

    Σ stage compute  +  Σ hop latency (half the hop's RTT)  +  Σ activation bytes / bandwidth

over the ``n - 1`` forward hops (each carries one token's hidden state) and the way back from
the last stage to the head (a token id: latency only). A pipeline of one stage has no hops.
Allocation (:mod:`parallax.scheduler.allocation`) ranks candidate pipelines by it; routing
(:mod:`parallax.scheduler.routing`) adds each stage's load to the compute term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_LAYER_LATENCY_MS = 1.0
"""Per-layer latency assumed when a node has neither a measurement nor a speed."""


@dataclass(frozen=True)
class Link:
    """A measured network link between two hosts (either direction)."""

    rtt_ms: float
    bandwidth_mbps: float = 0.0
    """Megabits per second; 0 means not measured (the transfer term is then left out)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise ValueError(f"rtt_ms must be finite and >= 0, got {self.rtt_ms}")
        if not (math.isfinite(self.bandwidth_mbps) and self.bandwidth_mbps >= 0):
            raise ValueError(f"bandwidth_mbps must be finite and >= 0, got {self.bandwidth_mbps}")

    def transfer_ms(self, num_bytes: int) -> float:
        """Time to push ``num_bytes`` through this link (0 when its bandwidth is unknown)."""
        if self.bandwidth_mbps <= 0 or num_bytes <= 0:
            return 0.0
        return num_bytes * 8 / (self.bandwidth_mbps * 1e3)

    def hop_ms(self, num_bytes: int = 0) -> float:
        """One-way latency (RTT / 2) plus the transfer of ``num_bytes``."""
        return self.rtt_ms / 2 + self.transfer_ms(num_bytes)


LOOPBACK = Link(0.0)


def layer_latency_ms(
    *, measured_ms: float = 0.0, layer_bytes: int = 0, speed_gbps: float = 0.0
) -> float:
    """Per-layer decode latency of a node: its measurement, else weights ÷ speed, else a default.

    ``speed_gbps`` is the node's roofline speed in weight-GB/s
    (:func:`parallax.scheduler.allocation.node_speed`): a decode step reads every weight once.
    """
    if measured_ms > 0 and math.isfinite(measured_ms):
        return measured_ms
    if speed_gbps > 0 and layer_bytes > 0:
        return layer_bytes / (speed_gbps * 1e9) * 1e3
    return DEFAULT_LAYER_LATENCY_MS


def pipeline_token_cost_ms(
    stage_compute_ms: Sequence[float],
    forward_links: Sequence[Link],
    return_link: Link | None,
    activation_bytes: int = 0,
) -> float:
    """Milliseconds one generated token costs on a pipeline (module docstring).

    ``stage_compute_ms[i]`` is stage ``i``'s compute for one token (layers × per-layer latency),
    ``forward_links[i]`` the hop from stage ``i`` to ``i + 1`` (``n - 1`` of them), and
    ``return_link`` the hop from the last stage back to the head (None for one stage).
    ``activation_bytes`` is one token's hidden state on the wire (hidden size × dtype bytes).
    """
    if len(forward_links) != max(0, len(stage_compute_ms) - 1):
        raise ValueError(
            f"{len(stage_compute_ms)} stages need {len(stage_compute_ms) - 1} forward links, "
            f"got {len(forward_links)}"
        )
    if any(not (math.isfinite(c) and c >= 0) for c in stage_compute_ms):
        raise ValueError("stage compute times must be finite and >= 0")
    hops = [link.hop_ms(activation_bytes) for link in forward_links]
    if len(stage_compute_ms) > 1 and return_link is not None:
        hops.append(return_link.hop_ms())
    return token_cost_ms(stage_compute_ms, hops)


def token_cost_ms(stage_compute_ms: Sequence[float], hop_ms: Sequence[float]) -> float:
    """The sum itself, for callers that already hold one-way hop costs (routing, per request):
    Σ stage compute + Σ hop costs."""
    return sum(stage_compute_ms) + sum(hop_ms)


def bottleneck_ms(stage_compute_ms: Sequence[float]) -> float:
    """The slowest stage's compute per token: with enough requests in flight a pipeline emits
    one token per this many milliseconds, whatever its network latency."""
    return max(stage_compute_ms, default=0.0)
