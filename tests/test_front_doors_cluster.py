"""The front doors against a REAL loopback cluster on the built-in model (issue 5, "Proof").

One module-wide cluster: `parallax run` + two `parallax join` nodes of 600 MB each, so the model
is split in a pipeline of two. Against it:

- `parallax gateway` (subprocess): password → 401, `/chat` answers "Paris" with real metrics,
  `/chat/stream` relays OpenAI chunks and `[DONE]`, `/cluster/status` in short form;
- `parallax chat` (subprocess): a streamed answer through it, and a client that goes away
  mid-stream frees the request on every node;
- the web UI served by the scheduler, in Debian's Chromium (skipped without it): chat with a
  streamed answer and its metrics, and the stop button frees the request on every node.
  Screenshots land in `test-artifacts/cluster-*.png`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import require, require_module
from processes import die_with_pytest, free_port
from test_cluster import START_TIMEOUT_S, LocalCluster, split_memory

from parallax.serving.sse import DONE_MARKER, parse_sse_lines

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
AUTH = {"Authorization": f"Bearer {PASSWORD}"}
QUESTION = "What is the capital of France?"
LONG_PROMPT = "Count from one to one thousand, one number per line."
SERVER_START_S = 30
FREED_WITHIN_S = 3.0
CHROMIUM = Path(os.environ.get("PARALLAX_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("front-doors"), num_nodes=2, memory=split_memory())
    try:
        status = cluster.wait_status({"available"}, START_TIMEOUT_S)
        assert len(status["pipelines"]) == 1 and len(status["pipelines"][0]) == 2
        yield cluster
    finally:
        cluster.close()


def _spawn_proxy(cluster: LocalCluster, name: str, args: list[str], ready_path: str,
                 headers: dict[str, str] | None = None) -> Iterator[str]:
    """Start `parallax <name>` against the cluster; yield its URL once `ready_path` answers."""
    port = free_port()
    log = open(cluster.tmp_path / f"{name}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "parallax.cli", name, "-s", f"127.0.0.1:{cluster.port}",
         "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, env=cluster.env, preexec_fn=die_with_pytest)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, f"`parallax {name}` exited with {proc.returncode}"
            try:
                if httpx.get(url + ready_path, headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"`parallax {name}` never came up"
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def gateway_url(cluster: LocalCluster) -> Iterator[str]:
    yield from _spawn_proxy(cluster, "gateway", ["--password", PASSWORD], "/cluster/status",
                            headers=AUTH)


@pytest.fixture(scope="module")
def chat_url(cluster: LocalCluster) -> Iterator[str]:
    yield from _spawn_proxy(cluster, "chat", [], "/")


# ---- helpers ---------------------------------------------------------------------------------


def _node_health(cluster: LocalCluster) -> dict[int, dict]:
    """`/health` of every node that has an executor (a standby node may answer 503)."""
    healthy = {}
    for port in cluster.node_ports:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        except httpx.HTTPError:
            continue
        if r.status_code == 200:
            healthy[port] = r.json()
    return healthy


def _is_idle(health: dict) -> bool:
    return (health["num_running"] == health["num_waiting"] == health["num_requests"] == 0
            and health["num_free_blocks"] == health["num_total_blocks"])


def _wait_nodes_idle(cluster: LocalCluster, within_s: float = FREED_WITHIN_S) -> float:
    """Seconds until every node with an executor is idle; fails after `within_s`."""
    started = time.monotonic()
    last: dict[int, dict] = {}
    while time.monotonic() - started < within_s:
        last = _node_health(cluster)
        if last and all(_is_idle(h) for h in last.values()):
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"the nodes did not free the request within {within_s} s: {last}")


def _busy_nodes(cluster: LocalCluster, within_s: float = 2.0) -> dict[int, dict]:
    """The nodes that hold a request (running, queued, or its KV blocks still taken); polls a
    little, since a node's numbers are those of its executor's last step."""
    deadline = time.monotonic() + within_s
    while True:
        busy = {port: h for port, h in _node_health(cluster).items() if not _is_idle(h)}
        if busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.1)


def _text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


# ---- parallax gateway ------------------------------------------------------------------------


def test_gateway_refuses_a_missing_or_wrong_password(gateway_url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": PASSWORD}):
        for method, path in (("POST", "/chat"), ("POST", "/chat/stream"),
                             ("GET", "/cluster/status")):
            r = httpx.request(method, gateway_url + path, headers=headers,
                              json={"prompt": QUESTION}, timeout=10)
            assert r.status_code == 401, (headers, path)
            body = r.json()
            assert body["object"] == "error" and body["code"] == 401
            assert body["type"] == "authentication_error" and "password" in body["message"]


def test_gateway_chat_answers_with_metrics(gateway_url: str) -> None:
    r = httpx.post(gateway_url + "/chat", headers=AUTH, timeout=120,
                   json={"prompt": QUESTION, "temperature": 0, "max_tokens": 32})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["response"]
    metrics = body["metrics"]
    assert metrics["prompt_tokens"] > 0 and metrics["completion_tokens"] > 0
    assert metrics["total_tokens"] == metrics["prompt_tokens"] + metrics["completion_tokens"]
    assert metrics["ttft_ms"] > 0 and metrics["duration_ms"] >= metrics["ttft_ms"]


def test_gateway_stream_relays_openai_chunks(gateway_url: str) -> None:
    with httpx.stream("POST", gateway_url + "/chat/stream", headers=AUTH, timeout=120,
                      json={"prompt": QUESTION, "temperature": 0, "max_tokens": 32}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(parse_sse_lines(response.iter_lines()))
    assert events[-1] == DONE_MARKER
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "Paris" in _text(events)


def test_gateway_cluster_status(gateway_url: str, cluster: LocalCluster) -> None:
    r = httpx.get(gateway_url + "/cluster/status", headers=AUTH, timeout=10)
    assert r.status_code == 200
    assert r.json() == {"status": "available", "nodes": 2,
                        "model": cluster.status()["model_name"]}
    assert "SmolLM2" in r.json()["model"]


# ---- parallax chat ---------------------------------------------------------------------------


def test_chat_streams_an_answer(chat_url: str) -> None:
    body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "temperature": 0, "max_tokens": 32}
    with httpx.stream("POST", chat_url + "/v1/chat/completions", json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        events = list(parse_sse_lines(response.iter_lines()))
    assert events[-1] == DONE_MARKER
    assert "Paris" in _text(events)


def test_chat_client_disconnect_frees_the_request_on_every_node(
        chat_url: str, cluster: LocalCluster) -> None:
    _wait_nodes_idle(cluster, within_s=10)
    body = {"messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True,
            "temperature": 0, "max_tokens": 300, "ignore_eos": True}
    chunks = 0
    with httpx.stream("POST", chat_url + "/v1/chat/completions", json=body,
                      timeout=60) as response:
        assert response.status_code == 200
        # keep the iterators referenced: a dropped httpx line iterator closes the connection,
        # which would abort the request before the busy check below
        lines = response.iter_lines()
        events = parse_sse_lines(lines)
        for event in events:
            assert event != DONE_MARKER, "the long answer ended before the test could leave"
            chunks += 1
            if chunks >= 5:
                break
        busy = _busy_nodes(cluster)  # still running: the check below means something
    assert chunks == 5
    assert busy, f"no node held the request while it streamed: {_node_health(cluster)}"
    _wait_nodes_idle(cluster)


# ---- the web UI in a browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require(CHROMIUM.exists(),
            f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = require_module("playwright.sync_api",
                              "browser tests need the playwright Python package")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"cluster-{name}.png"), full_page=True)


def _pin_sampling(route) -> None:
    """The UI has no sampling settings: pin greedy decoding so the answers are deterministic;
    a long prompt also gets `ignore_eos` so that it is still running when Stop is clicked."""
    body = json.loads(route.request.post_data or "{}")
    body["temperature"] = 0
    last = (body.get("messages") or [{}])[-1].get("content", "")
    if last == LONG_PROMPT:
        body.update(max_tokens=400, ignore_eos=True)
    else:
        body["max_tokens"] = 48
    route.continue_(post_data=json.dumps(body))


def test_web_ui_chats_and_stops_on_the_cluster(browser, cluster: LocalCluster) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route("**/v1/chat/completions", _pin_sampling)
        page.goto(cluster.url + "/")
        # available with a model: the UI goes straight to the chat page
        page.wait_for_selector("#page-chat:not([hidden])")
        page.wait_for_selector("#cluster-badge:text('available')")
        page.wait_for_selector("#pipelines:has-text('Pipeline 1')")
        assert page.locator("#pipelines .pipeline-node").count() == 2

        page.fill("#prompt", QUESTION)
        page.press("#prompt", "Enter")
        reply = page.locator(".msg.assistant").last
        page.wait_for_selector(".msg.assistant[data-state='done']")
        assert "Paris" in reply.locator(".content").inner_text()
        metrics = reply.locator(".metrics").inner_text()
        assert "TTFT" in metrics and "tok/s" in metrics and "tokens" in metrics, metrics
        _shot(page, "1-chat")

        _wait_nodes_idle(cluster, within_s=10)
        page.fill("#prompt", LONG_PROMPT)
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant[data-state='streaming']")
        page.wait_for_function(
            "() => { const r = [...document.querySelectorAll('.msg.assistant')].pop();"
            " return r.querySelector('.content').textContent.length > 20; }")
        assert page.is_visible("#stop") and not page.is_visible("#send")
        assert _busy_nodes(cluster), \
            f"no node held the request while it streamed: {_node_health(cluster)}"
        page.click("#stop")
        page.wait_for_selector(".msg.assistant[data-state='stopped']")
        _wait_nodes_idle(cluster)
        assert page.is_visible("#send")
        assert "stopped" in page.locator(".msg.assistant").last.locator(".metrics").inner_text()
        _shot(page, "2-stopped")
        assert errors == []
    finally:
        context.close()
