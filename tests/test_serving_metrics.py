"""Request timing and Prometheus metrics."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from parallax.serving.metrics import RequestTimer, ServingMetrics


def samples(metrics: ServingMetrics) -> dict[tuple[str, tuple], float]:
    body, ctype = metrics.render()
    assert ctype.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_timer_metrics_dict() -> None:
    t = RequestTimer(created=100.0)
    assert t.metrics_dict()["ttft_ms"] is None
    t.mark_tokens(now=100.25)
    for k in range(1, 11):
        t.mark_tokens(now=100.25 + 0.1 * k)
    t.finish(now=101.25)
    t.finish(now=500.0)  # idempotent
    assert t.completion_tokens == 11
    assert t.first_token_at == 100.25
    assert t.metrics_dict() == {"ttft_ms": 250.0, "tps": 10.0, "duration_ms": 1250.0}


def test_timer_zero_guards() -> None:
    t = RequestTimer(created=5.0)
    t.finish(now=5.0)
    assert t.metrics_dict() == {"ttft_ms": None, "tps": 0.0, "duration_ms": 0.0}
    one = RequestTimer(created=1.0)
    one.mark_tokens(now=1.5)
    one.finish(now=1.5)
    assert one.metrics_dict() == {"ttft_ms": 500.0, "tps": 2.0, "duration_ms": 500.0}
    burst = RequestTimer(created=1.0)
    burst.mark_tokens(3, now=1.0)
    burst.finish(now=1.0)
    assert burst.tps == 0.0
    burst.mark_tokens(0)
    assert burst.completion_tokens == 3


def test_timer_running_uses_clock() -> None:
    t = RequestTimer()
    t.mark_tokens()
    assert t.finished_at is None
    assert t.duration_s >= 0.0 and t.ttft_s is not None and t.ttft_s >= 0.0


def test_serving_metrics_records_and_renders() -> None:
    m = ServingMetrics()
    t = RequestTimer(created=0.0)
    t.mark_tokens(now=0.5)
    t.mark_tokens(4, now=1.5)
    t.finish(now=1.5)
    m.observe_request(200, "stop", prompt_tokens=12, timer=t)
    m.observe_request(429, None)
    m.set_queue(running=3, waiting=2)
    s = samples(m)
    assert s[("parallax_requests_total", (("finish_reason", "stop"), ("status", "200")))] == 1
    assert s[("parallax_requests_total", (("finish_reason", "none"), ("status", "429")))] == 1
    assert s[("parallax_prompt_tokens_total", ())] == 12
    assert s[("parallax_generation_tokens_total", ())] == 5
    assert s[("parallax_time_to_first_token_seconds_count", ())] == 1
    assert s[("parallax_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("parallax_tokens_per_second_sum", ())] == pytest.approx(4.0)
    assert s[("parallax_request_duration_seconds_sum", ())] == pytest.approx(1.5)
    assert s[("parallax_num_requests_running", ())] == 3
    assert s[("parallax_num_requests_waiting", ())] == 2


def test_registries_are_independent() -> None:
    a, b = ServingMetrics(), ServingMetrics()
    a.observe_request(200, "length", prompt_tokens=1)
    assert samples(a)[("parallax_prompt_tokens_total", ())] == 1
    assert samples(b)[("parallax_prompt_tokens_total", ())] == 0
