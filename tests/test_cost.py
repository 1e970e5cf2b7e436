"""The per-token cost model of a pipeline (pure)."""

from __future__ import annotations

import math

import pytest

from parallax.scheduler.cost import (
    DEFAULT_LAYER_LATENCY_MS,
    Link,
    bottleneck_ms,
    layer_latency_ms,
    pipeline_token_cost_ms,
)


def test_single_stage_is_compute_only() -> None:
    assert pipeline_token_cost_ms([12.5], [], Link(80.0), 8192) == 12.5


def test_sums_compute_half_rtts_and_transfers() -> None:
    # 3 stages, 2 forward hops with 20 and 40 ms RTT, 4 MB/s links carrying 4000 bytes
    links = [Link(20.0, 32.0), Link(40.0, 32.0)]  # 32 Mbit/s = 4 bytes per microsecond
    cost = pipeline_token_cost_ms([1.0, 2.0, 3.0], links, Link(60.0, 32.0), 4000)
    # compute 6 + one-way 10 + 20 + 30 + transfers 1 ms on each forward hop (not on the return)
    assert cost == pytest.approx(6 + 10 + 20 + 30 + 2 * 1.0)


def test_unknown_bandwidth_leaves_out_the_transfer() -> None:
    assert Link(10.0).hop_ms(10**9) == 5.0
    assert Link(10.0, 8.0).hop_ms(1000) == pytest.approx(5.0 + 1.0)


def test_more_distance_costs_more() -> None:
    near = pipeline_token_cost_ms([5, 5], [Link(4)], Link(4), 8192)
    far = pipeline_token_cost_ms([5, 5], [Link(120)], Link(120), 8192)
    assert far - near == pytest.approx(116)


def test_link_count_must_match_stages() -> None:
    with pytest.raises(ValueError, match="forward links"):
        pipeline_token_cost_ms([1.0, 1.0], [], None)


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_links_reject_bad_numbers(bad: float) -> None:
    with pytest.raises(ValueError):
        Link(bad)
    with pytest.raises(ValueError):
        Link(1.0, bad)
    with pytest.raises(ValueError):
        pipeline_token_cost_ms([bad], [], None)


def test_layer_latency_prefers_measurement_then_speed() -> None:
    assert layer_latency_ms(measured_ms=3.0, layer_bytes=10**9, speed_gbps=100) == 3.0
    # 1 GB of weights at 100 GB/s: 10 ms
    assert layer_latency_ms(layer_bytes=10**9, speed_gbps=100) == pytest.approx(10.0)
    assert layer_latency_ms() == DEFAULT_LAYER_LATENCY_MS


def test_bottleneck_is_the_slowest_stage() -> None:
    assert bottleneck_ms([1.0, 7.0, 3.0]) == 7.0
    assert bottleneck_ms([]) == 0.0
