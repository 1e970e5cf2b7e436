"""Replay on failure in a real loopback cluster: `parallax run` + three `parallax join` nodes on
the built-in model (a 2-stage pipeline and a standby, as in test_cluster.py).

Eight concurrent greedy streams run undisturbed once, then again while one node of the pipeline
(its tail, then, on a fresh cluster, its head) is killed (kill -9, frontend and executor)
mid-stream. Every stream must finish normally with the
undisturbed text, no error chunk, `metrics.failovers == 1`, and the new head's own counters must
show that it prefilled exactly prompt + generated ids (and decoded only the rest): a replay, not
a rerun from scratch with the text already sent suppressed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from processes import free_port
from test_cluster import START_TIMEOUT_S, LocalCluster, split_memory

from parallax.serving.sse import parse_sse_lines

pytestmark = pytest.mark.slow

NUM_STREAMS = 8
MAX_TOKENS = 48
LONG_TOKENS = 160  # streams that outlast two nodes' start-up and load
PROMPTS = [f"Write a short poem about the number {i}." for i in range(NUM_STREAMS)]


class ReplayCluster(LocalCluster):
    max_replays = 3
    heartbeat_timeout_s = 6  # a replay waits for the dead node's eviction: keep that short

    def scheduler_args(self) -> list[str]:
        return ["--replay-wait-s", "45"]


@pytest.fixture
def cluster(tmp_path_factory):
    """A fresh cluster for each test: a kill leaves no standby behind."""
    cluster = ReplayCluster(tmp_path_factory.mktemp("failover"), num_nodes=3,
                            memory=split_memory())
    try:
        cluster.wait_status({"available"}, START_TIMEOUT_S)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def undisturbed() -> list:
    """The undisturbed run's streams, taken once on the first test's cluster (greedy, same
    model and layout: the same text on every fresh cluster)."""
    return []


class Stream(threading.Thread):
    def __init__(self, url: str, prompt: str, max_tokens: int = MAX_TOKENS) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.events: list = []
        self.num_text = 0  # chunks with text so far
        self.error: Exception | None = None

    def run(self) -> None:
        body = {"model": "default", "messages": [{"role": "user", "content": self.prompt}],
                "max_tokens": self.max_tokens, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                              timeout=httpx.Timeout(30, read=150)) as response:
                for event in parse_sse_lines(response.iter_lines()):
                    self.events.append(event)
                    if isinstance(event, dict) and event.get("choices") and \
                            event["choices"][0]["delta"].get("content"):
                        self.num_text += 1
        except Exception as exc:  # reported by the test
            self.error = exc

    @property
    def chunks(self) -> list[dict]:
        return [e for e in self.events if isinstance(e, dict) and e.get("choices")]

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks)

    @property
    def final(self) -> dict:
        return self.chunks[-1]


def run_streams(url: str, until=None, max_tokens: int = MAX_TOKENS) -> list[Stream]:
    streams = [Stream(url, prompt, max_tokens) for prompt in PROMPTS]
    for stream in streams:
        stream.start()
    if until is not None:
        until(streams)
    for stream in streams:
        stream.join(180)
    return streams


def node_port(cluster: LocalCluster, node_id: str) -> int:
    return next(p for p in cluster.node_ports if node_id.endswith(f"-{p}"))


def health(cluster: LocalCluster, node_id: str) -> dict:
    port = node_port(cluster, node_id)
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()


def kill_node(cluster: LocalCluster, node_id: str) -> None:
    """kill -9 a node's frontend and executor, as a power cut would."""
    proc = cluster.nodes[node_port(cluster, node_id)]
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    proc.kill()
    for child in children:
        os.kill(int(child), signal.SIGKILL)


def reference_streams(cluster: LocalCluster, undisturbed: list) -> list[Stream]:
    if not undisturbed:
        reference = run_streams(cluster.url)
        assert all(s.error is None and s.final["choices"][0]["finish_reason"] in
                   ("length", "stop") for s in reference)
        assert all(s.final["metrics"]["failovers"] == 0 for s in reference)
        undisturbed.extend(reference)
    return undisturbed


def assert_kill_mid_stream_is_invisible(cluster: LocalCluster, reference: list[Stream],
                                        victim_id: str, after_kill=None) -> None:
    """Run the eight streams again, kill -9 `victim_id` once every stream has sent some text
    (then call `after_kill`), and check every stream against the undisturbed run and the new
    head's counters (it prefilled exactly prompt + generated ids, decoded only the rest)."""
    survivors = [n["node_id"] for n in cluster.status()["node_list"] if n["node_id"] != victim_id]
    before: dict[str, dict] = {}

    def kill_mid_stream(streams: list[Stream]) -> None:
        deadline = time.monotonic() + 120
        while min(s.num_text for s in streams) < 4:  # every stream has sent some text
            assert time.monotonic() < deadline, "the streams never started"
            assert all(s.is_alive() for s in streams), "a stream ended before the kill"
            time.sleep(0.02)
        kill_node(cluster, victim_id)
        # the pipeline's failure reaches the scheduler within a fraction of a second; the
        # replay waits for the dead node's eviction (heartbeat timeout), well after this
        time.sleep(1.5)
        before.update({n: health(cluster, n) for n in survivors})
        if after_kill is not None:
            after_kill()

    streams = run_streams(cluster.url, until=kill_mid_stream)
    for stream, expected in zip(streams, reference, strict=True):
        assert stream.error is None, stream.error
        assert stream.events[-1] == "[DONE]"
        assert not [e for e in stream.events if isinstance(e, dict) and
                    e.get("object") == "error"]
        assert stream.final["choices"][0]["finish_reason"] in ("length", "stop")
        assert stream.text == expected.text
        assert stream.final["usage"] == expected.final["usage"]
        assert stream.final["metrics"]["failovers"] == 1
        assert 0 < stream.final["metrics"]["replayed_tokens"] < \
            stream.final["usage"]["completion_tokens"]
        assert sum("role" in c["choices"][0]["delta"] for c in stream.chunks) == 1
        assert len({c["id"] for c in stream.chunks}) == 1

    # the scheduler's trace lists both attempts: the broken one on the victim's pipeline,
    # then the one that finished, with its stages (no API key: loopback is the operator)
    for stream in streams:
        trace = httpx.get(f"{cluster.url}/v1/traces/{stream.chunks[0]['id']}", timeout=10).json()
        assert trace["failovers"] == 1, trace
        broken, finished = trace["attempts"]
        assert victim_id in broken["pipeline"] and broken["outcome"] != "ok", trace
        assert victim_id not in finished["pipeline"] and finished["outcome"] == "ok", trace
        assert [s["node_id"] for s in finished["stages"]] == finished["pipeline"], trace

    status = cluster.status()
    new_head = status["pipelines"][0][0]
    assert victim_id not in {n for p in status["pipelines"] for n in p}
    after = health(cluster, new_head)
    replayed = [s.final["metrics"]["replayed_tokens"] for s in streams]
    prompts = [s.final["usage"]["prompt_tokens"] for s in streams]
    completions = [s.final["usage"]["completion_tokens"] for s in streams]
    # a node that joined after the kill counted nothing before it
    start = before.get(new_head, {"num_prefill_tokens": 0, "num_decode_tokens": 0,
                                  "num_prefix_hit_tokens": 0})
    prefilled = after["num_prefill_tokens"] - start["num_prefill_tokens"]
    decoded = after["num_decode_tokens"] - start["num_decode_tokens"]
    # what the head's prefix cache held (a shared system prompt) it did not compute again
    cached = after["num_prefix_hit_tokens"] - start["num_prefix_hit_tokens"]
    assert prefilled + cached == sum(prompts) + sum(replayed)
    # each new token but the last is fed back once: nothing generated before the kill again
    assert decoded == sum(c - r - 1 for c, r in zip(completions, replayed, strict=True))
    print(f"killed {victim_id}, head -> {new_head}; replay_ms "
          f"{sorted(s.final['metrics']['replay_ms'] for s in streams)}")


def test_killing_the_tail_mid_stream_is_invisible_to_eight_streams(cluster, undisturbed):
    reference = reference_streams(cluster, undisturbed)
    assert_kill_mid_stream_is_invisible(cluster, reference, cluster.status()["pipelines"][0][-1])


def test_killing_the_head_mid_stream_is_invisible_to_eight_streams(cluster, undisturbed):
    reference = reference_streams(cluster, undisturbed)
    # the head holds each request's ids and the scheduler's connection to it drops: the
    # scheduler resumes from the ids it saw on the internal leg, on the rebuilt pipeline
    assert_kill_mid_stream_is_invisible(cluster, reference, cluster.status()["pipelines"][0][0])


def test_killing_a_middle_stage_of_three_is_invisible(tmp_path_factory, undisturbed):
    """Three stages and a standby: the head notices the lost middle stage, the standby takes
    its layers, and the streams go on from where they were."""
    cluster = ReplayCluster(tmp_path_factory.mktemp("middle"), num_nodes=4,
                            memory=split_memory(0.42))
    try:
        status = cluster.wait_status({"available"}, START_TIMEOUT_S)
        assert [len(p) for p in status["pipelines"]] == [3], status["pipelines"]
        reference = reference_streams(cluster, undisturbed)
        assert_kill_mid_stream_is_invisible(cluster, reference, status["pipelines"][0][1])
    finally:
        cluster.close()


@pytest.mark.xfail(reason="fails on this 2-core AVX2 machine at f621328 too (passed in stop 21's "
                          "CI on another machine): after the tail dies the survivor and the late "
                          "joiner load their new layers but neither announces ready within "
                          "--replay-wait-s; not yet diagnosed", strict=False)
def test_with_no_spare_node_the_streams_wait_for_one_to_join(tmp_path_factory, undisturbed):
    """Two stages, no standby: after the tail dies the survivor cannot hold the model, so the
    streams stay open (keep-alives) until a node joins 25 s later, then complete."""
    cluster = ReplayCluster(tmp_path_factory.mktemp("nospare"), num_nodes=2,
                            memory=split_memory())
    try:
        status = cluster.wait_status({"available"}, START_TIMEOUT_S)
        assert len(status["pipelines"][0]) == 2 and len(status["node_list"]) == 2
        reference = reference_streams(cluster, undisturbed)

        def join_later() -> None:
            time.sleep(25)
            port = free_port()
            cluster.node_ports.append(port)
            cluster.nodes[port] = cluster.start_node(port)

        assert_kill_mid_stream_is_invisible(cluster, reference, status["pipelines"][0][-1],
                                            after_kill=join_later)
    finally:
        cluster.close()


def test_a_join_that_adds_a_pipeline_fails_no_running_request(tmp_path_factory):
    """Two nodes serve one pipeline; two more join mid-stream and form a second one. The
    serving pipeline is kept as it is (nothing reloads under a running request), the status
    says `rebalancing` (and stays `available`) while the new one loads, and every stream ends
    with the text of an undisturbed run."""
    cluster = ReplayCluster(tmp_path_factory.mktemp("join"), num_nodes=2, memory=split_memory())
    try:
        status = cluster.wait_status({"available"}, START_TIMEOUT_S)
        serving = status["pipelines"][0]
        reference = run_streams(cluster.url, max_tokens=LONG_TOKENS)
        seen: list[dict] = []

        def join_two(streams: list[Stream]) -> None:
            deadline = time.monotonic() + 180
            while min(s.num_text for s in streams) < 2:
                assert time.monotonic() < deadline, "the streams never started"
                time.sleep(0.02)
            for _ in range(2):
                port = free_port()
                cluster.node_ports.append(port)
                cluster.nodes[port] = cluster.start_node(port)
            while any(s.is_alive() for s in streams) and time.monotonic() < deadline:
                seen.append(cluster.status())
                time.sleep(0.2)

        streams = run_streams(cluster.url, until=join_two, max_tokens=LONG_TOKENS)
        for stream, expected in zip(streams, reference, strict=True):
            assert stream.error is None and stream.events[-1] == "[DONE]"
            assert stream.final["choices"][0]["finish_reason"] in ("length", "stop")
            assert stream.text == expected.text
            assert stream.final["metrics"]["failovers"] == 0
        assert all(s["pipelines"][0] == serving and s["status"] == "available" for s in seen)
        # the second pipeline was allocated and loading while the streams ran
        assert any(len(s["pipelines"]) == 2 and s["rebalancing"] for s in seen), seen[-1]
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(status["ready_pipelines"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            status = cluster.status()
        assert len(status["pipelines"]) == 2 and len(status["ready_pipelines"]) == 2
        assert status["rebalancing"] is False
    finally:
        cluster.close()
