"""Trace assembly as pure functions: a stage's records, the summary of the final chunk, the
scheduler's trace store, the Prometheus histograms fed by them, and the `parallax status` view."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from processes import free_port
from rich.console import Console

from parallax.node import tracing
from parallax.node.tracing import (
    STAGE_RECORD_LEN,
    StageTracer,
    ack_problem,
    hop_list,
    split_records,
    step_delay_s,
    trace_problem,
    trace_summary,
)
from parallax.protocol.common import PEER_LOST, TokenOutput, encode
from parallax.protocol.ipc import ExecutorStats, LinkSample
from parallax.protocol.links import LinkAck, LinkTokens, decode_link
from parallax.scheduler.replay import Failure
from parallax.scheduler.status import ClusterMetrics
from parallax.scheduler.traces import TraceStore, attempt_trace
from parallax.serving.metrics import ServingMetrics
from parallax.status_view import SchedulerUnreachable, fetch_status, render, slowest_of


class Clock:
    def __init__(self) -> None:
        self.ms = 1000.0

    def __call__(self) -> float:
        return self.ms


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(tracing, "now_ms", clock)
    return clock


def record(start, end, queue, compute, steps, hop_ms=0.0, hop_bytes=0, hops=0) -> list[float]:
    return [start, end, queue, compute, steps, hop_ms, hop_bytes, hops]


def test_a_stage_times_queue_compute_and_hops_with_its_own_clock(clock):
    tracer = StageTracer(10, 20)
    tracer.ready("r")  # the activations came at t=1000
    clock.ms = 1004.0
    tracer.ready("r")  # a second input before the step does not restart the queue time
    tracer.on_step(1007.0, 5.0, ["r"])  # the step started 7 ms after the input came
    tracer.ready("r")
    tracer.on_step(1010.0, 6.0, ["r", "r"])  # a request counts once per step
    send_id = tracer.on_send("tcp://next", [("r", 4608)])
    clock.ms = 1013.5
    tracer.on_ack(LinkAck(send_id, held_ms=0.5))  # round trip 9.5 - receiver 0.5
    tracer.on_ack(LinkAck(send_id, held_ms=0.5))  # a repeated ack counts nothing
    assert tracer.own("r") == record(10, 20, 7.0 + 6.0, 11.0, 2, 9.0, 4608, 1)
    assert tracer.take_link_samples() == [LinkSample("tcp://next", 9.0, 4608)]
    assert tracer.take_link_samples() == []


def test_records_chain_in_pipeline_order_and_are_forgotten():
    tracer = StageTracer(5, 9)
    upstream = record(0, 5, 1, 2, 3)
    tracer.set_upstream("r", upstream)
    tracer.on_step(0.0, 4.0, ["r"])
    assert tracer.trace_of("r") == upstream + record(5, 9, 0, 4.0, 1)
    tracer.forget("r")
    assert tracer.trace_of("r") == record(5, 9, 0, 0, 0)
    assert tracer.records == {} and tracer.upstream == {}


def test_records_and_unacked_sends_are_bounded(monkeypatch):
    monkeypatch.setattr(tracing, "MAX_TRACED_REQUESTS", 3)
    monkeypatch.setattr(tracing, "MAX_UNACKED", 2)
    tracer = StageTracer(0, 1)
    for i in range(5):
        tracer.ready(f"r{i}")
        tracer.on_send("tcp://x", [(f"r{i}", 1)])
    assert list(tracer.records) == ["r2", "r3", "r4"] and list(tracer.unacked) == [4, 5]


def test_the_summary_names_stages_orders_hops_and_marks_the_slowest():
    trace = (record(0, 10, 3.0, 40.0, 10, 5.0, 1000, 10)
             + record(10, 20, 1.0, 900.0, 10, 6.0, 900, 9)
             + record(20, 30, 2.0, 50.0, 10, 7.0, 80, 9))
    summary = trace_summary(trace, ["a", "b", "c"])
    assert summary["stages"] == [
        {"node_id": "a", "layers": [0, 10], "compute_ms": 40.0, "queue_ms": 3.0, "steps": 10,
         "ms_per_token": 4.0},
        {"node_id": "b", "layers": [10, 20], "compute_ms": 900.0, "queue_ms": 1.0, "steps": 10,
         "ms_per_token": 90.0},
        {"node_id": "c", "layers": [20, 30], "compute_ms": 50.0, "queue_ms": 2.0, "steps": 10,
         "ms_per_token": 5.0}]
    assert summary["hops_ms"] == [5.0, 6.0, 7.0] and summary["hop_bytes"] == [1000, 900, 80]
    assert summary["slowest_stage"] == 1
    assert hop_list(summary) == [
        {"from": "a", "to": "b", "ms": 5.0, "bytes": 1000},
        {"from": "b", "to": "c", "ms": 6.0, "bytes": 900},
        {"from": "c", "to": "a", "ms": 7.0, "bytes": 80}]


def test_a_single_node_has_no_hops_and_an_empty_trace_no_summary():
    summary = trace_summary(record(0, 30, 1.0, 20.0, 4), ["local"])
    assert "hops_ms" not in summary and summary["slowest_stage"] == 0
    assert summary["stages"][0]["ms_per_token"] == 5.0
    assert trace_summary([], ["a"]) == {}
    assert trace_summary(record(0, 30, 0, 0, 0), ["a"])["slowest_stage"] is None
    assert split_records([1.0] * (STAGE_RECORD_LEN + 3)) == [
        dict.fromkeys(tracing.RECORD_FIELDS, 1.0)]


def test_malformed_traces_and_acks_are_refused():
    assert trace_problem(record(0, 1, 0, 0, 0)) is None
    assert trace_problem([1.0] * 7) is not None
    assert trace_problem(record(0, 1, -1.0, 0, 0)) is not None
    assert trace_problem(record(0, 1, float("nan"), 0, 0)) is not None
    assert trace_problem([0.0] * STAGE_RECORD_LEN * (tracing.MAX_TRACE_STAGES + 1)) is not None
    assert ack_problem(LinkAck(3, 0.2)) is None
    assert ack_problem(LinkAck(0, 0.2)) is not None
    assert ack_problem(LinkAck(3, float("inf"))) is not None


def test_stage_messages_with_traces_round_trip_and_bad_ones_are_dropped():
    from parallax.node.links import LinkLimits, link_problem

    limits = LinkLimits(576, 4096, 8192, 49152)
    out = TokenOutput("r", 5, True, "stop", trace=record(0, 30, 1, 2, 3))
    message = decode_link(encode(LinkTokens([out], 7, "tcp://a:1")))
    assert message.outputs[0].trace == out.trace and message.send_id == 7
    assert link_problem(message, limits) is None
    bad = LinkTokens([TokenOutput("r", 5, trace=[1.0, 2.0])])
    assert "trace" in link_problem(bad, limits)
    assert link_problem(decode_link(encode(LinkAck(0, 1.0))), limits) is not None


def test_the_step_delay_setting_is_validated(monkeypatch):
    monkeypatch.delenv(tracing.STEP_DELAY_ENV, raising=False)
    assert step_delay_s() == 0.0
    monkeypatch.setenv(tracing.STEP_DELAY_ENV, "80")
    assert step_delay_s() == 0.08
    for bad in ("fast", "-1", "1e9"):
        monkeypatch.setenv(tracing.STEP_DELAY_ENV, bad)
        with pytest.raises(ValueError, match=tracing.STEP_DELAY_ENV):
            step_delay_s()


# ---- the scheduler's side ------------------------------------------------------------------


def final_chunk(trace: list[float], ids: list[str]) -> dict:
    return {"choices": [{"finish_reason": "stop"}],
            "metrics": {"ttft_ms": 12.0, "tps": 30.0, **trace_summary(trace, ids)}}


def test_a_failed_over_request_lists_each_attempt_and_the_ring_is_bounded():
    store = TraceStore(capacity=2)
    broken = attempt_trace("c1", ["a", "b"], None, Failure(PEER_LOST, "node b is gone"))
    done = attempt_trace("c1-r1", ["a", "c"], final_chunk(
        record(0, 15, 1, 10, 5, 2.0, 100, 5) + record(15, 30, 1, 20, 5, 3.0, 50, 5),
        ["a", "c"]))
    store.add("c1", [broken, done], "stop")
    trace = store.get("c1")
    assert trace["failovers"] == 1 and [a["rid"] for a in trace["attempts"]] == ["c1", "c1-r1"]
    assert broken["outcome"] == PEER_LOST and broken["stages"] == [] and \
        broken["error"] == "node b is gone"
    assert done["outcome"] == "ok" and [s["node_id"] for s in done["stages"]] == ["a", "c"]
    assert done["hops"][1] == {"from": "c", "to": "a", "ms": 3.0, "bytes": 50}
    assert done["ttft_ms"] == 12.0 and done["slowest_stage"] == 1
    assert store.stage_ms == {"a": 2.0, "c": 4.0}
    store.add("c2", [done], "stop")
    store.add("c3", [done], "stop")
    assert store.get("c1") is None and store.get("c3") is not None
    store.forget_node("a")
    assert store.stage_ms == {"c": 4.0}


def test_scheduler_histograms_per_stage_and_link_come_from_final_chunks():
    metrics = ClusterMetrics()
    metrics.observe_final("p", final_chunk(
        record(0, 15, 1, 10, 5, 2.0, 100, 5) + record(15, 30, 1, 20, 5, 3.0, 50, 5),
        ["a", "b"]))
    text = metrics.render()[0].decode()
    assert 'parallax_scheduler_stage_step_seconds_sum{node="b"} 0.004' in text
    assert 'parallax_scheduler_link_bytes_sum{link="a->b"} 100.0' in text
    assert 'parallax_scheduler_link_transfer_seconds_count{link="b->a"} 1.0' in text


def test_node_histograms_of_steps_prefix_hits_and_links():
    metrics = ServingMetrics()
    stats = ExecutorStats(num_waiting=3, num_prefill_tokens=30, step_ms=20.0, num_batched=2,
                          num_prefix_hit_tokens=10)
    metrics.observe_step(stats, [LinkSample("tcp://n:1", 1.5, 4096)])
    metrics.observe_step(ExecutorStats(num_prefill_tokens=30, num_prefix_hit_tokens=10))
    text = metrics.render()[0].decode()
    assert "parallax_step_seconds_sum 0.02" in text
    assert "parallax_batch_size_sum 2.0" in text and "parallax_queue_depth_sum 3.0" in text
    assert "parallax_prefix_cache_hit_ratio_sum 0.25" in text  # 10 of 40 prompt tokens
    assert "parallax_prefix_cache_hit_ratio_count 1.0" in text  # no prefill: no sample
    assert 'parallax_link_transfer_seconds_sum{peer="tcp://n:1"} 0.0015' in text
    assert 'parallax_link_bytes_sum{peer="tcp://n:1"} 4096.0' in text


# ---- `parallax status` ---------------------------------------------------------------------


STATUS = {"status": "available", "model_name": "SmolLM2-135M-Instruct", "reason": "",
          "node_list": [
              {"node_id": "n-1", "status": "ready", "device": "cpu", "start_layer": 0,
               "end_layer": 12, "running_requests": 1, "ms_per_token": 3.5},
              {"node_id": "n-2", "status": "ready", "device": "cpu", "start_layer": 12,
               "end_layer": 30, "running_requests": 1, "ms_per_token": 88.0},
              {"node_id": "n-3", "status": "standby", "device": "cpu", "start_layer": None,
               "end_layer": None, "running_requests": 0, "ms_per_token": None}],
          "pipelines": [["n-1", "n-2"]], "ready_pipelines": [0]}


def test_the_status_view_shows_nodes_pipelines_and_the_slowest_stage():
    console = Console(width=160, record=True, color_system=None)
    console.print(render(STATUS, "http://h:3001"))
    out = console.export_text()
    assert "Nodes (3)" in out and "n-3" in out and "standby" in out
    rows = [line.split() for line in out.splitlines() if "n-1" in line or "n-2" in line]
    assert ["1", "1", "n-1", "[0,", "12)", "3.5"] == [c for c in rows[-2] if c not in "│┃"]
    assert ["2", "n-2", "[12,", "30)", "88.0", "slowest"] == [c for c in rows[-1]
                                                          if c not in "│┃"]
    assert slowest_of(STATUS["node_list"][:2]) == 1 and slowest_of(STATUS["node_list"][:1]) is None


def test_the_status_view_reads_the_scheduler_or_says_why_not():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "sched":
            return httpx.Response(200, json={"type": "cluster_status", "data": STATUS})
        return httpx.Response(200, text="<html>")

    client = httpx.Client(transport=httpx.MockTransport(handler))
    assert fetch_status(client, "http://sched:1") == STATUS
    with pytest.raises(SchedulerUnreachable, match="not answer with a cluster status"):
        fetch_status(client, "http://other:1")


@pytest.mark.slow
def test_parallax_status_exits_with_one_line_when_the_scheduler_is_unreachable():
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "parallax.cli", "status", "-s",
                           f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"parallax status: error: the scheduler at http://127.0.0.1:{port} is unreachable "
        "(ConnectError); is `parallax run` up there?"]
    assert "Traceback" not in done.stderr + done.stdout
