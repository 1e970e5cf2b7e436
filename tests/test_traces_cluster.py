"""Traces through a real 3-stage loopback pipeline (the built-in SmolLM2 GGUF), one node made
slow with the test-only PARALLAX_TEST_STEP_DELAY_MS; and `parallax status` in a tmux pane.

One cluster serves every test of this module (module fixture): the scheduler has an API key,
so the trace endpoint's operator check is the key's.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from conftest import require, require_module
from test_cluster import START_TIMEOUT_S, LocalCluster, split_memory

from parallax.node.tracing import STEP_DELAY_ENV
from parallax.serving.sse import parse_sse_lines

pytestmark = pytest.mark.slow

API_KEY = "trace-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# large next to the noise in a stage's own step time on a heavily loaded 2-core machine (there,
# 10 layers of the built-in model took from 0.1 to 3.4 s a step, varying with the other load)
DELAY_MS = 3000
SLOW_NODE = 1  # index into the node ports: this node sleeps DELAY_MS in every engine step
HIDDEN_SIZE = 576  # SmolLM2-135M


class SlowNodeCluster(LocalCluster):
    """Three nodes that each hold about a third of the model (one 3-stage pipeline)."""

    def scheduler_args(self) -> list[str]:
        return ["--api-key", API_KEY]

    def start_node(self, port: int) -> subprocess.Popen:
        if port != self.node_ports[SLOW_NODE]:
            return super().start_node(port)
        plain, self.env = self.env, {**self.env, STEP_DELAY_ENV: str(DELAY_MS)}
        try:
            return super().start_node(port)
        finally:
            self.env = plain


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlowNodeCluster(tmp_path_factory.mktemp("traces"), num_nodes=3,
                              memory=split_memory(0.42))
    try:
        cluster.wait_status({"available"}, 2 * START_TIMEOUT_S)  # three loads on 2 cores
        yield cluster
    finally:
        cluster.close()


def slow_node_id(cluster: LocalCluster) -> str:
    port = cluster.node_ports[SLOW_NODE]
    return next(n["node_id"] for n in cluster.status()["node_list"]
                if n["node_id"].endswith(f"-{port}"))


@pytest.fixture(scope="module")
def traced(cluster):
    """One greedy streamed request: (its events, its final chunk)."""
    body = {"model": "default", "messages": [{"role": "user", "content": "Name three fruits."}],
            "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=180) as response:
        assert response.status_code == 200
        events = list(parse_sse_lines(response.iter_lines()))
    finals = [e for e in events if isinstance(e, dict) and e.get("choices")
              and e["choices"][0].get("finish_reason")]
    assert events[-1] == "[DONE]" and finals, events[-3:]
    return events, finals[-1]


def test_the_final_chunk_lists_the_stages_in_order_and_marks_the_slow_node(cluster, traced):
    _, final = traced
    status = cluster.status()
    assert [len(p) for p in status["pipelines"]] == [3], status["pipelines"]
    pipeline = status["pipelines"][0]
    layers = {n["node_id"]: [n["start_layer"], n["end_layer"]] for n in status["node_list"]}
    metrics = final["metrics"]
    stages = metrics["stages"]
    assert [s["node_id"] for s in stages] == pipeline
    assert [s["layers"] for s in stages] == [layers[n] for n in pipeline]
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == 30
    assert all(a["layers"][1] == b["layers"][0] for a, b in zip(stages[:-1], stages[1:], strict=True))
    completion = final["usage"]["completion_tokens"]
    for stage in stages:
        assert stage["steps"] >= completion, stage  # a step per token, and the prefill
        assert stage["queue_ms"] >= 0 and stage["compute_ms"] > 0

    slow = pipeline.index(slow_node_id(cluster))
    assert metrics["slowest_stage"] == slow, stages
    others = [s for i, s in enumerate(stages) if i != slow]
    assert stages[slow]["compute_ms"] >= max(s["compute_ms"] for s in others) + DELAY_MS
    assert stages[slow]["ms_per_token"] >= DELAY_MS  # every step of it slept the delay

    # hops: head -> 2 -> 3 -> head; the head sent the hidden states of every token it ran
    assert len(metrics["hops_ms"]) == 3 and all(h >= 0 for h in metrics["hops_ms"])
    sent = final["usage"]["prompt_tokens"] + completion - 1
    assert metrics["hop_bytes"][0] in (sent * HIDDEN_SIZE * 4, sent * HIDDEN_SIZE * 2)
    assert 0 < metrics["hop_bytes"][1] <= metrics["hop_bytes"][0]
    assert metrics["hop_bytes"][2] > 0  # token messages back to the head


def test_the_scheduler_keeps_the_trace_for_the_operator(cluster, traced):
    events, final = traced
    rid = final["id"]
    anonymous = httpx.get(f"{cluster.url}/v1/traces/{rid}", timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.json()["object"] == "error" and anonymous.json()["code"] == 401
    missing = httpx.get(f"{cluster.url}/v1/traces/chatcmpl-none", headers=AUTH, timeout=5)
    assert missing.status_code == 404 and missing.json()["code"] == 404

    trace = httpx.get(f"{cluster.url}/v1/traces/{rid}", headers=AUTH, timeout=5).json()
    assert trace["id"] == rid and trace["failovers"] == 0 and trace["finish_reason"] in (
        "stop", "length")
    [attempt] = trace["attempts"]
    pipeline = cluster.status()["pipelines"][0]
    assert attempt["pipeline"] == pipeline and attempt["outcome"] == "ok"
    assert [s["node_id"] for s in attempt["stages"]] == pipeline
    assert attempt["stages"] == [{k: s[k] for k in attempt["stages"][0]}
                                 for s in final["metrics"]["stages"]]
    assert [(h["from"], h["to"]) for h in attempt["hops"]] == [
        (pipeline[0], pipeline[1]), (pipeline[1], pipeline[2]), (pipeline[2], pipeline[0])]
    assert [h["bytes"] for h in attempt["hops"]] == final["metrics"]["hop_bytes"]

    # the cluster view (web UI, `parallax status`) shows the traced ms/token: slow node highest
    nodes = {n["node_id"]: n for n in cluster.status()["node_list"]}
    speeds = [nodes[n]["ms_per_token"] for n in pipeline]
    assert max(speeds) == nodes[slow_node_id(cluster)]["ms_per_token"]

    text = httpx.get(f"{cluster.url}/metrics", timeout=5).text
    assert f'parallax_scheduler_stage_step_seconds_count{{node="{pipeline[0]}"}}' in text
    assert f'parallax_scheduler_link_bytes_count{{link="{pipeline[0]}->{pipeline[1]}"}}' in text


def test_node_metrics_have_step_and_link_histograms(cluster, traced):
    head = cluster.status()["pipelines"][0][0]
    port = next(p for p in cluster.node_ports if head.endswith(f"-{p}"))
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for name in ("parallax_step_seconds_count", "parallax_batch_size_count",
                 "parallax_queue_depth_count", "parallax_prefix_cache_hit_ratio_count"):
        count = next(line for line in text.splitlines() if line.startswith(name))
        assert float(count.split()[-1]) >= 1, count
    assert "parallax_link_transfer_seconds_count{peer=\"tcp://" in text
    assert "parallax_link_bytes_bucket{" in text


def test_parallax_status_in_a_terminal_shows_nodes_and_pipelines(cluster, traced, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux (apt-get install tmux) for a pseudo-terminal")
    socket = f"parallax-status-{os.getpid()}"
    command = " ".join(shlex.quote(a) for a in [
        "env", f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}", sys.executable, "-m",
        "parallax.cli", "status", "-s", f"127.0.0.1:{cluster.port}", "--interval", "0.5"])
    tmux = ["tmux", "-L", socket]
    subprocess.run([*tmux, "new-session", "-d", "-s", "status", "-x", "200", "-y", "50",
                    command], check=True, timeout=10)
    try:
        status = cluster.status()
        pipeline = status["pipelines"][0]
        screen = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "status"],
                                    capture_output=True, text=True, timeout=10).stdout
            if "Pipelines" in screen and "slowest" in screen:
                break
            time.sleep(0.5)
        assert "Nodes (3)" in screen and "Pipelines" in screen, screen
        for node in status["node_list"]:
            assert node["node_id"] in screen
        table = screen[screen.index("Pipelines"):]
        layers = {n["node_id"]: (n["start_layer"], n["end_layer"]) for n in status["node_list"]}
        for number, node in enumerate(pipeline, 1):  # one row per stage, in order
            row = next(line for line in table.splitlines() if f" {node} " in line)
            assert f" {number} " in row and f"[{layers[node][0]}, {layers[node][1]})" in row
            assert ("slowest" in row) == (node == slow_node_id(cluster)), row
        time.sleep(1.5)  # it refreshes live: still running, not exited
        panes = subprocess.run([*tmux, "list-panes", "-t", "status", "-F", "#{pane_dead}"],
                               capture_output=True, text=True, timeout=10).stdout
        assert panes.strip() == "0"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)


def test_the_web_ui_marks_the_slow_node_in_its_pipeline_panel(cluster, traced):
    chromium = os.environ.get("PARALLAX_CHROMIUM", "/usr/bin/chromium")
    require(os.path.exists(chromium), f"needs Chromium at {chromium}")
    sync_api = require_module("playwright.sync_api", "needs the playwright Python package")
    from test_web_ui import LAUNCH_ARGS  # (Chromium exists: that module imports cleanly)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(cluster.url + "/")
            page.wait_for_selector("#page-chat:not([hidden])")
            slow = page.locator(".pipeline-node.slowest")
            slow.wait_for()
            assert slow.get_attribute("data-node-id") == slow_node_id(cluster)
            assert slow.locator(".stage-speed").inner_text().endswith("ms/token · slowest")
            assert page.locator(".pipeline-node .stage-speed").count() == 3
        finally:
            browser.close()
