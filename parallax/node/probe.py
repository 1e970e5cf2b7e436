"""A node measures its network: RTT and a short bandwidth probe to the peers the scheduler lists.

RTT is the best of two ``GET /health`` round trips to a peer's frontend (any answer counts; the
body is not read beyond what the server sends at once). Bandwidth is one ``GET /node/probe`` that
returns :data:`PROBE_BYTES` bytes; at most that many are read, whatever a peer sends, and every
call has a timeout, so a stranger's answer can only make the link look slow or unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

import httpx

from parallax import protocol as P
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


async def measure_peer(client: httpx.AsyncClient, target: P.ProbeTarget) -> P.LinkReport | None:
    """RTT and bandwidth to one peer; None when it did not answer in time."""
    try:
        rtt = min([await _round_trip_ms(client, target.http_url) for _ in range(2)])
        total, received = await _download_ms(client, target.http_url)
    except (httpx.HTTPError, httpx.StreamError, OSError) as exc:
        logger.debug("probe of %s failed: %s", target.node_id, exc)
        return None
    if not math.isfinite(rtt):
        return None
    return P.LinkReport(target.node_id, round(rtt, 3),
                        round(bandwidth_mbps(total, rtt, received), 3))


async def measure_peers(client: httpx.AsyncClient,
                        targets: Sequence[P.ProbeTarget]) -> list[P.LinkReport]:
    """Measure up to :data:`MAX_PROBE_PEERS` peers, a few at a time, within
    :data:`ROUND_TIMEOUT_S` in all; peers that did not answer are left out."""
    gate = asyncio.Semaphore(PARALLEL_PROBES)

    async def one(target: P.ProbeTarget) -> P.LinkReport | None:
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
