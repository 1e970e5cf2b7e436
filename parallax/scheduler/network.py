"""The scheduler's latency matrix: what nodes measured to each other and to the scheduler.

Nodes probe the peers the scheduler lists for them (:func:`probe_targets`, at most
:data:`MAX_PROBE_PEERS` a round) and report RTT and bandwidth in heartbeats. A link's figure is
the *worse* of its two ends' reports (higher RTT, lower bandwidth), so one node cannot make
itself look near. A link only one end has measured yet is taken as the worse of that report and
the estimate through the scheduler (RTT a→scheduler + scheduler→b, each end's own report); a
link nobody measured uses that estimate, or 0 ms when even that is unknown (loopback tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from parallax.scheduler.cost import LOOPBACK, Link

MAX_PROBE_PEERS = 16
"""Peers one node probes per round (its pipeline neighbours first)."""
MAX_RTT_MS = 60_000.0
MAX_BANDWIDTH_MBPS = 1_000_000.0
REPORT_TTL_S = 600.0
"""Reports older than this are ignored (a node re-measures every few tens of seconds)."""


@dataclass(frozen=True)
class _Report:
    link: Link
    at: float


def valid_measurement(rtt_ms: float, bandwidth_mbps: float) -> bool:
    """Finite, non-negative and within sane bounds (RTT ≤ 60 s, bandwidth ≤ 1 Tbit/s)."""
    return (
        math.isfinite(rtt_ms)
        and math.isfinite(bandwidth_mbps)
        and 0 <= rtt_ms <= MAX_RTT_MS
        and 0 <= bandwidth_mbps <= MAX_BANDWIDTH_MBPS
    )


def worse(a: Link, b: Link) -> Link:
    """The worse of two views of one link: the higher RTT and the lower known bandwidth."""
    known = [bw for bw in (a.bandwidth_mbps, b.bandwidth_mbps) if bw > 0]
    return Link(max(a.rtt_ms, b.rtt_ms), min(known) if known else 0.0)


@dataclass
class LatencyMatrix:
    """Link reports keyed by (reporter, peer); ``link(a, b)`` answers the conservative figure."""

    reports: dict[tuple[str, str], _Report] = field(default_factory=dict)
    to_scheduler: dict[str, _Report] = field(default_factory=dict)
    now: float = 0.0  # time of the latest report: staleness is judged against it

    def report(
        self,
        reporter: str,
        links: Iterable[tuple[str, float, float]],
        now: float,
        scheduler_rtt_ms: float = 0.0,
    ) -> int:
        """Record ``reporter``'s (peer, rtt_ms, bandwidth_mbps) measurements; returns how many
        were valid (the rest — bad numbers, itself — are ignored)."""
        self.now = max(self.now, now)
        if scheduler_rtt_ms > 0 and valid_measurement(scheduler_rtt_ms, 0.0):
            self.to_scheduler[reporter] = _Report(Link(scheduler_rtt_ms), now)
        taken = 0
        for peer, rtt_ms, bandwidth_mbps in links:
            if peer == reporter or not valid_measurement(rtt_ms, bandwidth_mbps):
                continue
            self.reports[(reporter, peer)] = _Report(Link(rtt_ms, bandwidth_mbps), now)
            taken += 1
        return taken

    def forget(self, node_id: str) -> None:
        """Drop everything measured by or to a node that left."""
        self.to_scheduler.pop(node_id, None)
        for key in [k for k in self.reports if node_id in k]:
            del self.reports[key]

    def _fresh(self, report: _Report | None) -> Link | None:
        if report is None or self.now - report.at > REPORT_TTL_S:
            return None
        return report.link

    def via_scheduler(self, a: str, b: str) -> Link | None:
        """RTT a→scheduler→b from each end's own report; None when either is unknown."""
        ra, rb = self._fresh(self.to_scheduler.get(a)), self._fresh(self.to_scheduler.get(b))
        if ra is None or rb is None:
            return None
        return Link(ra.rtt_ms + rb.rtt_ms)

    def link(self, a: str, b: str) -> Link:
        """The conservative figure for the link between ``a`` and ``b`` (module docstring)."""
        if a == b:
            return LOOPBACK
        ab = self._fresh(self.reports.get((a, b)))
        ba = self._fresh(self.reports.get((b, a)))
        if ab is not None and ba is not None:
            return worse(ab, ba)
        estimate = self.via_scheduler(a, b)
        one = ab or ba
        if one is None:
            return estimate or LOOPBACK
        return one if estimate is None else worse(one, estimate)

    def __call__(self, a: str, b: str) -> Link:
        return self.link(a, b)

    def measured_at(self, reporter: str, peer: str) -> float | None:
        """When ``reporter`` last measured ``peer`` (None: never, or too long ago)."""
        report = self.reports.get((reporter, peer))
        return None if self._fresh(report) is None else report.at


def probe_targets(
    matrix: LatencyMatrix,
    node_id: str,
    neighbours: Sequence[str],
    others: Iterable[str],
    limit: int = MAX_PROBE_PEERS,
) -> list[str]:
    """Which peers ``node_id`` should measure next, at most ``limit``.

    Its pipeline neighbours first, then peers that measured it but that it has not measured
    (so both ends of a link report soon), then the peers it measured longest ago.
    """
    picked = [n for n in dict.fromkeys(neighbours) if n != node_id][:limit]
    chosen = set(picked)
    rest = [n for n in others if n != node_id and n not in chosen]

    def priority(peer: str) -> tuple[int, float]:
        mine = matrix.measured_at(node_id, peer)
        theirs = matrix.measured_at(peer, node_id)
        if mine is None:
            return (0 if theirs is not None else 1, 0.0)
        return (2, mine)

    rest.sort(key=priority)
    return picked + rest[: max(0, limit - len(picked))]
