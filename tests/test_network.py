"""The latency matrix, probe targets and the node's network probes (pure / mocked HTTP)."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from parallax.node import probe
from parallax.protocol.control import LinkReport, ProbeTarget
from parallax.scheduler.cost import Link
from parallax.scheduler.network import (
    MAX_PROBE_PEERS,
    REPORT_TTL_S,
    LatencyMatrix,
    probe_targets,
)


def test_link_is_the_worse_of_both_ends() -> None:
    m = LatencyMatrix()
    m.report("a", [("b", 10.0, 100.0)], now=1.0)
    m.report("b", [("a", 30.0, 400.0)], now=1.0)
    assert m.link("a", "b") == Link(30.0, 100.0) == m.link("b", "a")
    assert m.link("a", "a").rtt_ms == 0.0


def test_one_node_cannot_make_itself_look_near() -> None:
    m = LatencyMatrix()
    m.report("far", [("near", 0.0, 0.0)], now=1.0, scheduler_rtt_ms=0.1)  # lies
    m.report("near", [("far", 120.0, 20.0)], now=1.0, scheduler_rtt_ms=4.0)
    assert m.link("far", "near").rtt_ms == 120.0
    # before the honest end reported, the estimate through the scheduler is a floor
    m2 = LatencyMatrix()
    m2.report("far", [("near", 0.0, 0.0)], now=1.0, scheduler_rtt_ms=60.0)
    m2.report("near", [], now=1.0, scheduler_rtt_ms=4.0)
    assert m2.link("near", "far").rtt_ms == pytest.approx(64.0)


def test_unmeasured_links_use_the_scheduler_estimate_else_zero() -> None:
    m = LatencyMatrix()
    assert m.link("x", "y").rtt_ms == 0.0
    m.report("x", [], now=1.0, scheduler_rtt_ms=10.0)
    m.report("y", [], now=1.0, scheduler_rtt_ms=50.0)
    assert m.link("x", "y").rtt_ms == 60.0


@pytest.mark.parametrize("rtt, bw", [(-1.0, 1.0), (math.inf, 1.0), (math.nan, 1.0),
                                      (1.0, -5.0), (1e9, 1.0), (1.0, math.inf)])
def test_bad_measurements_are_dropped(rtt: float, bw: float) -> None:
    m = LatencyMatrix()
    assert m.report("a", [("b", rtt, bw), ("c", 5.0, 10.0), ("a", 1.0, 1.0)], now=1.0) == 1
    assert ("a", "b") not in m.reports and ("a", "a") not in m.reports


def test_stale_reports_and_left_nodes_are_forgotten() -> None:
    m = LatencyMatrix()
    m.report("a", [("b", 10.0, 0.0)], now=0.0)
    m.report("b", [("a", 10.0, 0.0)], now=0.0)
    m.report("c", [], now=REPORT_TTL_S + 1)
    assert m.link("a", "b").rtt_ms == 0.0  # too old: unknown again
    m.report("a", [("b", 10.0, 0.0)], now=REPORT_TTL_S + 1)
    m.forget("a")
    assert not any("a" in key for key in m.reports)


def test_probe_targets_are_bounded_neighbours_first_then_unanswered() -> None:
    m = LatencyMatrix()
    others = [f"n{i}" for i in range(40)]
    m.report("n30", [("me", 5.0, 0.0)], now=1.0)  # measured me: I should measure it back
    m.report("me", [("n0", 5.0, 0.0)], now=1.0)  # measured recently: last in line
    picked = probe_targets(m, "me", ["n5", "me", "n7"], ["me", *others])
    assert len(picked) == MAX_PROBE_PEERS and len(set(picked)) == MAX_PROBE_PEERS
    assert picked[:3] == ["n5", "n7", "n30"]
    assert "n0" not in picked and "me" not in picked


# ---- the node's probes over a mocked network ---------------------------------------------


def run(coro):
    return asyncio.run(coro)


def test_measure_peers_times_rtt_and_bandwidth_and_survives_strangers(monkeypatch) -> None:
    monkeypatch.setattr(probe, "ROUND_TIMEOUT_S", 0.5)

    async def body(chunk: bytes, count: int | None):
        sent = 0
        while count is None or sent < count:  # None: a stranger that never stops sending
            yield chunk
            sent += 1

    async def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "slow":
            await asyncio.sleep(5)
        if host == "broken":
            raise httpx.ConnectError("refused")
        if request.url.path == "/node/probe":
            endless = host == "flood"
            return httpx.Response(200, content=body(bytes(8192), None if endless else 8))
        return httpx.Response(503, content=body(b'{"status": "loading"}', 1))

    targets = [ProbeTarget(h, f"http://{h}") for h in ("good", "slow", "broken", "flood")]

    async def main() -> list[LinkReport]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await probe.measure_peers(client, targets)

    reports = {r.node_id: r for r in run(main())}
    assert set(reports) == {"good", "flood"}
    for report in reports.values():
        assert 0 <= report.rtt_ms < 500 and report.bandwidth_mbps > 0


def test_bandwidth_estimate() -> None:
    # 64 KiB in 30 ms of which 4 ms was the round trip: 524288 bits / 26 ms ≈ 20.2 Mbit/s
    assert probe.bandwidth_mbps(30.0, 4.0, probe.PROBE_BYTES) == pytest.approx(20.16, rel=1e-2)
    assert probe.bandwidth_mbps(30.0, 4.0, 100) == 0.0  # too little came back to tell
