"""A node measures its network: RTT and a short bandwidth probe to the peers the scheduler lists.

RTT is the best of :data:`RTT_SAMPLES` ``GET /health`` round trips to a peer's frontend (any
answer counts; the body is not read beyond what the server sends at once). Bandwidth is one ``GET /node/probe`` that
returns :data:`PROBE_BYTES` bytes; at most that many are read, whatever a peer sends, and every
call has a timeout, so a stranger's answer can only make the link look slow or unreachable.

A busy event loop or CPU on either end only ever adds delay, so a node reports for each peer the
best figure of its last :data:`HISTORY_ROUNDS` rounds (:class:`LinkHistory`), the way TCP keeps a
windowed minimum RTT: load does not make a near peer look far (and re-plan a serving pipeline),
while a link that really got slower shows within that many rounds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence

import httpx

from parallax.protocol.control import LinkReport, ProbeTarget
from parallax.scheduler.network import MAX_BANDWIDTH_MBPS, MAX_PROBE_PEERS

logger = logging.getLogger("parallax.probe")

PROBE_BYTES = 64 * 1024
"""Size of the bandwidth probe: about 26 ms at 20 Mbit/s, small enough to repeat."""
PROBE_BODY = bytes(PROBE_BYTES)
PROBE_TIMEOUT_S = 2.0
"""Per call; a peer slower than this is left out of the report (unreachable for a pipeline)."""
ROUND_TIMEOUT_S = 10.0
PROBE_INTERVAL_S = 30.0
"""Nodes re-measure this often (links degrade; the scheduler re-plans from fresh figures)."""
PARALLEL_PROBES = 4
RTT_SAMPLES = 3
HISTORY_ROUNDS = 3


async def _round_trip_ms(client: httpx.AsyncClient, url: str) -> float:
    start = time.perf_counter()
    async with client.stream("GET", f"{url}/health", timeout=PROBE_TIMEOUT_S) as response:
        async for _ in response.aiter_raw():
            break  # the first bytes are enough: this times the network, not the body
    return (time.perf_counter() - start) * 1e3


async def _download_ms(client: httpx.AsyncClient, url: str) -> tuple[float, int]:
    received = 0
    start = time.perf_counter()
    async with client.stream("GET", f"{url}/node/probe", timeout=PROBE_TIMEOUT_S) as response:
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received >= PROBE_BYTES:
                break
    return (time.perf_counter() - start) * 1e3, min(received, PROBE_BYTES)


def bandwidth_mbps(total_ms: float, rtt_ms: float, num_bytes: int) -> float:
    """Megabits per second of a download of ``num_bytes`` that took ``total_ms`` including one
    round trip (0 when too little came back to tell; capped at 1 Tbit/s)."""
    if num_bytes < PROBE_BYTES // 4:
        return 0.0
    transfer_ms = max(total_ms - rtt_ms, 1e-3)
    return min(MAX_BANDWIDTH_MBPS, num_bytes * 8 / transfer_ms / 1e3)


async def measure_peer(client: httpx.AsyncClient, target: ProbeTarget) -> LinkReport | None:
    """RTT and bandwidth to one peer; None when it did not answer in time."""
    try:
        rtt = min([await _round_trip_ms(client, target.http_url) for _ in range(RTT_SAMPLES)])
        total, received = await _download_ms(client, target.http_url)
    except (httpx.HTTPError, httpx.StreamError, OSError) as exc:
        logger.debug("probe of %s failed: %s", target.node_id, exc)
        return None
    if not math.isfinite(rtt):
        return None
    return LinkReport(target.node_id, round(rtt, 3),
                      round(bandwidth_mbps(total, rtt, received), 3))


async def measure_peers(client: httpx.AsyncClient,
                        targets: Sequence[ProbeTarget]) -> list[LinkReport]:
    """Measure up to :data:`MAX_PROBE_PEERS` peers, a few at a time, within
    :data:`ROUND_TIMEOUT_S` in all; peers that did not answer are left out."""
    gate = asyncio.Semaphore(PARALLEL_PROBES)

    async def one(target: ProbeTarget) -> LinkReport | None:
        async with gate:
            return await measure_peer(client, target)

    tasks = [asyncio.create_task(one(t)) for t in targets[:MAX_PROBE_PEERS]]
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, timeout=ROUND_TIMEOUT_S)
    for task in pending:
        task.cancel()
    return [r for t in done if not t.cancelled() and t.exception() is None
            and (r := t.result()) is not None]


class LinkHistory:
    """Each listed peer's last :data:`HISTORY_ROUNDS` reports, summarised as the best of them
    (lowest RTT, highest bandwidth): module docstring."""

    def __init__(self, rounds: int = HISTORY_ROUNDS) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.rounds = rounds
        self._seen: dict[str, deque[LinkReport]] = {}

    def update(self, reports: Sequence[LinkReport], listed: Sequence[str]) -> list[LinkReport]:
        """Add one round's ``reports``; returns the summary of every peer in ``listed`` that
        answered in one of the last rounds (peers no longer listed are forgotten)."""
        for report in reports:
            self._seen.setdefault(report.node_id, deque(maxlen=self.rounds)).append(report)
        wanted = set(listed)
        self._seen = {peer: seen for peer, seen in self._seen.items() if peer in wanted}
        return [
            LinkReport(peer, min(r.rtt_ms for r in seen), max(r.bandwidth_mbps for r in seen))
            for peer, seen in self._seen.items()
        ]
