"""The scheduler app end to end, without a model: the real app on uvicorn (its own thread) and fake
nodes that join and heartbeat through the real endpoints and answer chat requests with scripted
SSE streams. The user message scripts the fake head: `HOLD` waits for `release`, `SLOW` streams
for seconds, `DROP` breaks the connection mid-stream; anything else answers at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from parallax.cli import build_parser
from parallax.config import ConfigError, SchedulerConfig
from parallax.node.link_auth import key_id, parse_key
from parallax.scheduler.allocation import ModelSpec
from parallax.scheduler.app import SchedulerState, build_app
from parallax.scheduler.catalog import CURATED_CONFIGS, ModelCatalog
from parallax.scheduler.forward import StreamPeek
from parallax.serving.errors import error_body
from parallax.serving.sse import DONE, encode_event, parse_sse_lines

MB = 2**20
SPEC = ModelSpec("test-model", num_layers=8, layer_bytes=10 * MB, embedding_bytes=10 * MB,
                 lm_head_bytes=10 * MB, kv_bytes_per_token_per_layer=0)
OTHER = ModelSpec("other-model", num_layers=6, layer_bytes=10 * MB, embedding_bytes=10 * MB,
                  lm_head_bytes=10 * MB, kv_bytes_per_token_per_layer=0)
HALF = 70  # MB: a node holds 4 of 8 layers as first or last stage, so 2 nodes make a pipeline
WHOLE = 200  # MB: one node holds the whole model
METRICS = {"ttft_ms": 12.5, "tps": 40.0, "duration_ms": 60.0}
NO_FAILOVER = {"failovers": 0, "replay_ms": 0.0, "replayed_tokens": 0}  # the scheduler adds


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class ServerThread:
    """A uvicorn server on free 127.0.0.1 ports (`num_ports` of them), in a daemon thread."""

    def __init__(self, app: FastAPI, num_ports: int = 1) -> None:
        sockets = []
        for _ in range(num_ports):
            sockets.append(socket.socket())
            sockets[-1].bind(("127.0.0.1", 0))
        self.ports = [sock.getsockname()[1] for sock in sockets]
        self.port = self.ports[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets},
                                       daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, what="server start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def _chunk(rid: str, delta: dict, finish: str | None = None, **extra: Any) -> bytes:
    return encode_event({"id": rid, "object": "chat.completion.chunk", "created": 0,
                         "model": "test-model",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                   "total_tokens": 5}, **extra})


class FakeNodes:
    """Every fake node's HTTP frontend, one app on several ports: each node gets its own port
    (a node's http_url is `http://host:port`, nothing more)."""

    def __init__(self, num_ports: int = 8) -> None:
        self.received: list[tuple[str, dict]] = []
        self.join_tokens: list[str | None] = []  # X-Join-Token of each chat request
        self.cancelled: list[str] = []
        self.busy: set[str] = set()
        self.release = threading.Event()
        self.server = ServerThread(self._app(), num_ports)
        self.node_of_port: dict[int, str] = {}

    def url(self, node_id: str) -> str:
        port = next((p for p, n in self.node_of_port.items() if n == node_id), None)
        if port is None:
            port = next(p for p in self.server.ports if p not in self.node_of_port)
            self.node_of_port[port] = node_id
        return f"http://127.0.0.1:{port}"

    def heads(self) -> list[str]:
        return [node_id for node_id, _ in self.received]

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            node_id = self.node_of_port[request.scope["server"][1]]
            body = await request.json()
            self.received.append((node_id, body))
            self.join_tokens.append(request.headers.get("x-join-token"))
            if node_id in self.busy:
                return JSONResponse(error_body(429, f"{node_id} is full"), status_code=429)
            if not body.get("stream") and body["messages"][-1]["content"] == "HOLD":
                for _ in range(500):  # a non-streaming answer computed for up to 5 s
                    if await request.is_disconnected():
                        self.cancelled.append(body["rid"])
                        return JSONResponse({}, status_code=499)
                    await asyncio.sleep(0.01)
            if not body.get("stream"):
                return {"id": body["rid"], "object": "chat.completion", "model": "test-model",
                        "choices": [{"index": 0, "message": {"role": "assistant",
                                                             "content": "Hello there"},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                  "total_tokens": 5}, "metrics": METRICS}
            text = body["messages"][-1]["content"]
            return StreamingResponse(self._stream(body["rid"], text),
                                     media_type="text/event-stream")

        return app

    async def _stream(self, rid: str, text: str):
        finished = False
        try:
            yield _chunk(rid, {"role": "assistant", "content": ""})
            if text == "HOLD":
                for _ in range(1000):  # at most 10 s
                    if self.release.is_set():
                        break
                    await asyncio.sleep(0.01)
            elif text == "SLOW":
                for _ in range(200):  # 10 s unless the scheduler hangs up
                    yield _chunk(rid, {"content": "."})
                    await asyncio.sleep(0.05)
            elif text == "DROP":
                raise RuntimeError("the fake node dies mid-stream")
            yield _chunk(rid, {"content": "Hello"})
            yield _chunk(rid, {"content": " there"})
            yield _chunk(rid, {}, "stop", metrics=METRICS)
            yield DONE
            finished = True
        finally:
            if not finished:
                self.cancelled.append(rid)


@pytest.fixture
def nodes() -> Iterator[FakeNodes]:
    fake = FakeNodes()
    yield fake
    fake.release.set()
    fake.server.stop()


class Scheduler:
    """A scheduler app on uvicorn plus a client that plays the node agents."""

    def __init__(self, nodes: FakeNodes, model: str | None = "test-model", **overrides: Any):
        # fake nodes advertise *.test activation endpoints from a loopback connection
        settings = {"retry_attempts": 2, "retry_interval_s": 0.05, "mdns": False,
                    "allow_advertised_hosts": ("*.test",), **overrides}
        self.config = SchedulerConfig(**settings)
        catalog = ModelCatalog(known={"test-model": SPEC, "other-model": OTHER}, curated={},
                               include_builtin=False)
        self.state = SchedulerState(self.config, catalog=catalog)
        if model is not None:
            self.state.set_model(model, self.config.init_nodes_num)
        self.nodes = nodes
        self.server = ServerThread(build_app(self.state))
        self.url = self.server.url
        token = self.config.join_token
        self.http = httpx.Client(base_url=self.url, timeout=10,
                                 headers={"X-Join-Token": token} if token else {})
        self.secrets: dict[str, str] = {}  # node_secret of each node's last join
        self.link_key_ids: dict[str, str] = {}  # what each node's executor would hold

    def join_body(self, node_id: str, memory_mb: int, max_running: int = 32,
                  **fields: Any) -> dict:
        return {"node_id": node_id, "device": "cpu", "device_name": "fake cpu",
                "memory_bytes": memory_mb * MB, "gflops": 100.0, "bandwidth_gbps": 10.0,
                "http_url": self.nodes.url(node_id),
                "activation_endpoint": f"tcp://{node_id}.test:5000",
                "max_running_requests": max_running, **fields}

    def node_headers(self, node_id: str) -> dict[str, str]:
        return {"X-Node-Secret": self.secrets[node_id]} if node_id in self.secrets else {}

    def join(self, node_id: str, memory_mb: int, max_running: int = 32, **fields: Any) -> dict:
        response = self.http.post("/node/join", headers=self.node_headers(node_id),
                                  json=self.join_body(node_id, memory_mb, max_running, **fields))
        assert response.status_code == 200, response.text
        self.secrets[node_id] = response.json()["node_secret"]
        return response.json()

    def heartbeat(self, node_id: str, loaded: dict | None = None, **fields: Any) -> dict:
        body = {"node_id": node_id, "state": "ready" if loaded else "loading",
                "link_key_id": self.link_key_ids.get(node_id, ""), **fields}
        if loaded:
            body.update(loaded_model=loaded["model"], loaded_start_layer=loaded["start_layer"],
                        loaded_end_layer=loaded["end_layer"])
        response = self.http.post("/node/heartbeat", json=body,
                                  headers=self.node_headers(node_id))
        assert response.status_code == 200, response.text
        # as a node agent does: its executor takes the pipeline's link key from the answer
        self.link_key_ids[node_id] = key_id(parse_key(response.json().get("link_key", "")))
        return response.json()

    def leave(self, node_id: str) -> dict:
        response = self.http.post("/node/leave", json={"node_id": node_id},
                                  headers=self.node_headers(node_id))
        assert response.status_code == 200, response.text
        return response.json()

    def bring_up(self, memory: dict[str, int], max_running: int = 32) -> dict[str, dict | None]:
        """Join every node, then report each one's assigned range as loaded."""
        for node_id, memory_mb in memory.items():
            self.join(node_id, memory_mb, max_running)
        assignments = {n: self.heartbeat(n)["assignment"] for n in memory}
        for node_id, assignment in assignments.items():
            if assignment is not None:
                self.heartbeat(node_id, assignment)
        return assignments

    def status(self) -> dict:
        body = self.http.get("/cluster/status_json").json()
        assert body["type"] == "cluster_status"
        return body["data"]

    def chat(self, text: str = "hi", stream: bool = True, **extra: Any) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": text}], "stream": stream, **extra}
        return self.http.post("/v1/chat/completions", json=body)

    def stop(self) -> None:
        self.http.close()
        self.server.stop()


@pytest.fixture
def scheduler(nodes: FakeNodes) -> Iterator[Callable[..., Scheduler]]:
    started: list[Scheduler] = []

    def start(**kwargs: Any) -> Scheduler:
        started.append(Scheduler(nodes, **kwargs))
        return started[-1]

    yield start
    nodes.release.set()
    for s in started:
        s.stop()


def sse_events(response: httpx.Response) -> list:
    return list(parse_sse_lines(response.text.splitlines()))


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


# ---- tests ------------------------------------------------------------------------------------


def test_join_allocate_heartbeat_available_and_stream_through(scheduler, nodes):
    s = scheduler(init_nodes_num=2)
    first = s.join("a", HALF)
    assert first["assignment"] is None and first["heartbeat_interval_s"] > 0
    status = s.status()
    assert status["status"] == "waiting" and status["need_more_nodes"] is True
    assert [n["status"] for n in status["node_list"]] == ["waiting"]
    second = s.join("b", HALF)
    assert second["assignment"]["model"] == "test-model"
    assert s.status()["status"] == "rebalancing" and s.chat().status_code == 503
    assignments = {n: s.heartbeat(n)["assignment"] for n in ("a", "b")}
    for node_id, assignment in assignments.items():
        s.heartbeat(node_id, assignment, running_requests=0, layer_latency_ms=0.5)
    status = s.status()
    assert status["status"] == "available" and status["need_more_nodes"] is False
    assert status["max_running_request"] == 32 and len(status["pipelines"]) == 1
    ranges = sorted((n["start_layer"], n["end_layer"]) for n in status["node_list"])
    assert ranges[0][0] == 0 and ranges[-1][1] == 8 and ranges[0][1] == ranges[1][0]
    node = status["node_list"][0]
    assert set(node) == {"node_id", "status", "device", "device_name", "memory_gb",
                         "start_layer", "end_layer", "running_requests", "gflops",
                         "layer_latency_ms", "link_encryption", "download", "ms_per_token"}
    assert node["status"] == "ready" and node["device_name"] == "fake cpu"
    assert node["link_encryption"] == "none"  # no TLS, no P2P: the links are in the clear

    # the official openai client streams through the scheduler
    from openai import OpenAI

    client = OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello there"
    assert [m.id for m in client.models.list().data] == ["test-model"]
    head, body = nodes.received[-1]
    assert head == status["pipelines"][0][0]
    assert body["rid"].startswith("chatcmpl-") and "model" not in body
    table = body["routing_table"]
    assert [e["node_id"] for e in table] == status["pipelines"][0]
    assert table[0]["start_layer"] == 0 and table[-1]["end_layer"] == 8
    assert table[0]["http_url"] == nodes.url(head) and table[0]["activation_endpoint"]

    # non-streaming, a client-chosen rid (ignored: the scheduler names requests), model names
    response = s.chat(stream=False, rid="my-rid", model="default")
    assert response.status_code == 200  # the head streamed it; the scheduler assembled it
    assert response.json()["metrics"] == {**METRICS, **NO_FAILOVER}
    assert response.json()["choices"][0]["message"]["content"] == "Hello there"
    assert nodes.received[-1][1]["rid"].startswith("chatcmpl-")
    missing = s.chat(model="nope")
    assert missing.status_code == 404 and missing.json()["object"] == "error"
    assert s.chat(model="test-model").status_code == 200

    metrics = s.http.get("/metrics").text
    pipeline = ">".join(status["pipelines"][0])
    assert f'parallax_scheduler_pipeline_requests_total{{pipeline="{pipeline}"}} 3.0' in metrics
    assert "parallax_scheduler_time_to_first_token_seconds_count 3.0" in metrics
    assert "parallax_scheduler_tokens_per_second_count 3.0" in metrics
    assert f'parallax_scheduler_pipeline_completion_tokens_total{{pipeline="{pipeline}"}} 6.0' \
        in metrics
    assert 'parallax_scheduler_node_running_requests{node="a"} 0.0' in metrics
    assert "parallax_scheduler_queue_depth 0.0" in metrics
    assert 'parallax_scheduler_requests_total{status="503"} 1.0' in metrics
    assert 'parallax_scheduler_requests_total{status="404"}' not in metrics  # never routed


def test_requests_spread_over_two_pipelines(scheduler, nodes):
    s = scheduler()
    s.bring_up({"a": HALF, "b": HALF, "c": HALF, "d": HALF})
    status = s.status()
    assert len(status["pipelines"]) == 2 and len(status["ready_pipelines"]) == 2
    threads = [in_thread(lambda: s.chat("HOLD")) for _ in range(2)]
    wait_until(lambda: len(nodes.received) == 2, what="two requests at the heads")
    heads = set(nodes.heads())
    assert heads == {p[0] for p in status["pipelines"]}
    assert sorted(n["running_requests"] for n in s.status()["node_list"]) == [1, 1, 1, 1]
    for node_id, body in nodes.received:
        table = body["routing_table"]
        assert table[0]["node_id"] == node_id and [e["node_id"] for e in table] in \
            status["pipelines"]
    nodes.release.set()
    for thread, out in threads:
        thread.join(timeout=5)
        assert out[0].status_code == 200 and sse_events(out[0])[-1] == "[DONE]"
    wait_until(lambda: all(n["running_requests"] == 0 for n in s.status()["node_list"]),
               what="slots given back")


def all_busy_retries(s) -> float:
    """The scheduler's count of routing waits for a pipeline with room (its /metrics)."""
    prefix = 'parallax_scheduler_route_retries_total{reason="all_busy"}'
    lines = [line for line in s.http.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_all_busy_waits_then_succeeds_when_room_frees(scheduler, nodes):
    s = scheduler(retry_attempts=400, retry_interval_s=0.05)  # 20 s budget: loaded CI
    s.bring_up({"a": WHOLE}, max_running=1)
    first, first_out = in_thread(lambda: s.chat("HOLD"))
    wait_until(lambda: len(nodes.received) == 1, what="first request at the node")
    second, second_out = in_thread(lambda: s.chat("hi"))
    wait_until(lambda: "parallax_scheduler_queue_depth 1.0" in s.http.get("/metrics").text,
               what="second request queued")
    # it looked for room again and again (retry_interval_s apart) and found none
    wait_until(lambda: all_busy_retries(s) >= 3, what="three all-busy retries")
    assert len(nodes.received) == 1  # still waiting for room
    nodes.release.set()
    for thread, out in ((first, first_out), (second, second_out)):
        thread.join(timeout=5)
        assert out[0].status_code == 200 and sse_events(out[0])[-1] == "[DONE]"
    assert len(nodes.received) == 2


def test_retries_exhausted_answer_429(scheduler, nodes):
    s = scheduler(retry_attempts=3, retry_interval_s=0.05)
    s.bring_up({"a": WHOLE}, max_running=1)
    first, out = in_thread(lambda: s.chat("HOLD"))
    wait_until(lambda: len(nodes.received) == 1, what="first request at the node")
    started = time.monotonic()
    response = s.chat("hi")
    assert response.status_code == 429
    assert response.json()["object"] == "error" and response.json()["code"] == 429
    assert 0.1 <= time.monotonic() - started < 3
    nodes.release.set()
    first.join(timeout=5)
    assert out[0].status_code == 200


def test_head_failures_retry_on_another_pipeline_then_give_up(scheduler, nodes):
    s = scheduler(retry_attempts=3, retry_interval_s=0.02)
    s.bring_up({"a": WHOLE, "b": WHOLE})
    assert len(s.status()["pipelines"]) == 2
    nodes.busy.add("a")  # answers 429: the scheduler must try b
    for _ in range(3):
        assert s.chat().status_code == 200
    assert set(nodes.heads()) <= {"a", "b"} and nodes.heads().count("b") == 3
    nodes.busy.add("b")
    response = s.chat()
    assert response.status_code == 429 and "full" in response.json()["message"]


def test_unreachable_head_is_skipped_and_no_pipeline_is_503(scheduler, nodes):
    s = scheduler(retry_attempts=2, retry_interval_s=0.02)
    assert s.chat().status_code == 503  # no nodes at all
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    s.join("dead", WHOLE, http_url=dead_url)
    s.heartbeat("dead", s.heartbeat("dead")["assignment"])
    response = s.chat()
    assert response.status_code == 503 and "unreachable" in response.json()["message"]
    s.bring_up({"b": WHOLE})
    assert all(s.chat().status_code == 200 for _ in range(2))
    assert nodes.heads() == ["b", "b"]


def test_head_dying_mid_stream_ends_with_an_error_event(scheduler, nodes):
    s = scheduler(max_replays=0)  # replay off (tests/test_replay_scheduler.py has it on)
    s.bring_up({"a": WHOLE})
    events = sse_events(s.chat("DROP"))
    assert events[-1] == "[DONE]" and events[-2]["object"] == "error"
    assert s.status()["node_list"][0]["running_requests"] == 0


def test_node_endpoints_require_the_join_token(scheduler, nodes):
    s = scheduler(join_token="s3cret")
    join = {"node_id": "x", "device": "cpu", "device_name": "cpu", "memory_bytes": WHOLE * MB,
            "gflops": 1.0, "bandwidth_gbps": 1.0, "http_url": nodes.url("x"),
            "activation_endpoint": "tcp://x"}
    for headers in ({}, {"X-Join-Token": "wrong"}):
        response = httpx.post(f"{s.url}/node/join", json=join, headers=headers)
        assert response.status_code == 401 and response.json()["object"] == "error"
        for path, body in (("/node/heartbeat", {"node_id": "x", "state": "idle"}),
                           ("/node/leave", {"node_id": "x"})):
            assert httpx.post(f"{s.url}{path}", json=body, headers=headers).status_code == 401
    assert s.status()["node_list"] == []
    assert s.join("x", WHOLE)["node_id"] == "x"  # s.http sends the token
    assert [n["node_id"] for n in s.status()["node_list"]] == ["x"]
    # a direct loopback client of a scheduler without an API key is its operator
    command = s.http.get("/node/join/command").json()
    assert command == {"type": "node_join_command",
                       "data": {"command": f"parallax join -s 127.0.0.1:{s.config.port} "
                                           "--join-token s3cret"}}
    # one relayed by our own proxies is not: the token is replaced by a placeholder
    relayed = s.http.get("/node/join/command", headers={"X-Parallax-Relayed": "chat"}).json()
    assert relayed["data"]["command"] == (f"parallax join -s 127.0.0.1:{s.config.port} "
                                          "--join-token <token>")
    bad = s.http.post("/node/join", content=b'{"node_id": 3}')
    assert bad.status_code == 400 and bad.json()["object"] == "error"


def test_chats_to_nodes_carry_the_join_token(scheduler, nodes):
    """Nodes of a cluster with a token answer only their scheduler, which sends it."""
    s = scheduler(join_token="s3cret")
    assignment = s.join("a", WHOLE)["assignment"]
    s.heartbeat("a", assignment)
    assert s.chat(stream=False).status_code == 200
    assert nodes.join_tokens == ["s3cret"]


def test_rejoin_replaces_and_leave_removes(scheduler, nodes):
    s = scheduler()
    s.bring_up({"a": WHOLE})
    s.join("a", WHOLE, device_name="restarted")  # same identity after a restart
    status = s.status()
    assert [n["node_id"] for n in status["node_list"]] == ["a"]
    assert status["node_list"][0]["device_name"] == "restarted"
    assert status["status"] == "rebalancing"  # must report its layers loaded again
    assert s.leave("a") == {"ok": True, "known": True}
    assert s.status()["node_list"] == [] and s.status()["status"] == "waiting"
    assert s.heartbeat("a")["known"] is False


def test_silent_node_is_evicted(scheduler, nodes):
    s = scheduler(heartbeat_timeout_s=1.0, evict_interval_s=0.05)
    s.bring_up({"a": WHOLE, "b": WHOLE})
    assert s.status()["status"] == "available"
    deadline = time.monotonic() + 15  # generous: a loaded CI machine slows everything
    while "a" in [n["node_id"] for n in s.status()["node_list"]]:  # b beats, a is silent
        assert time.monotonic() < deadline, "a was never evicted"
        s.heartbeat("b", s.heartbeat("b")["assignment"])
        time.sleep(0.05)
    assert [n["node_id"] for n in s.status()["node_list"]] == ["b"]
    assert s.heartbeat("a")["known"] is False
    assert s.status()["status"] == "available" and s.status()["pipelines"] == [["b"]]


def test_scheduler_init_switches_the_model(scheduler, nodes):
    s = scheduler(model=None)
    status = s.status()
    assert status["model_name"] is None and status["status"] == "waiting"
    assert status["need_more_nodes"] is False
    assert s.chat().status_code == 503
    assert s.http.get("/v1/models").json() == {"object": "list", "data": []}
    bad = s.http.post("/scheduler/init", json={"model_name": "no such thing!"})
    assert bad.status_code == 400 and bad.json()["object"] == "error"
    init = s.http.post("/scheduler/init", json={"model_name": "test-model", "init_nodes_num": 1,
                                                "is_local_network": True})
    assert init.status_code == 200 and init.json()["data"]["model_name"] == "test-model"
    before = s.bring_up({"a": WHOLE})["a"]
    assert before == {"model": "test-model", "start_layer": 0, "end_layer": 8,
                      "generation": before["generation"]}
    assert s.status()["status"] == "available"
    s.http.post("/scheduler/init", json={"model_name": "other-model", "init_nodes_num": 1})
    assert s.status()["status"] == "rebalancing" and s.status()["model_name"] == "other-model"
    after = s.heartbeat("a", before)["assignment"]  # still holding the old model
    assert after["model"] == "other-model" and (after["start_layer"], after["end_layer"]) == (0, 6)
    assert after["generation"] > before["generation"]
    s.heartbeat("a", after)
    assert s.status()["status"] == "available"
    assert s.chat(model="other-model").status_code == 200


def test_client_disconnect_closes_the_upstream_stream(scheduler, nodes):
    s = scheduler()
    s.bring_up({"a": WHOLE})
    with s.http.stream("POST", "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "SLOW"}],
                             "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        rid = nodes.received[-1][1]["rid"]
    wait_until(lambda: rid in nodes.cancelled, timeout=5, what="the fake head's stream cancelled")
    wait_until(lambda: s.status()["node_list"][0]["running_requests"] == 0, what="slot back")


def test_client_leaving_a_non_streaming_request_hangs_up_on_the_head(scheduler, nodes):
    s = scheduler()
    s.bring_up({"a": WHOLE})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{s.url}/v1/chat/completions", timeout=0.5,
                   json={"messages": [{"role": "user", "content": "HOLD"}]})
    rid = nodes.received[-1][1]["rid"]
    wait_until(lambda: rid in nodes.cancelled, timeout=5, what="the fake head sees the hang-up")
    wait_until(lambda: s.status()["node_list"][0]["running_requests"] == 0, what="slot back")


def test_api_key_guards_v1_only(scheduler, nodes):
    s = scheduler(api_key="k3y", join_token="t0ken-s3cret")
    s.bring_up({"a": WHOLE})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}):
        response = httpx.get(f"{s.url}/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["type"] == "authentication_error"
    assert s.chat().status_code == 401
    ok = {"Authorization": "Bearer k3y"}
    assert httpx.get(f"{s.url}/v1/models", headers=ok).status_code == 200
    response = httpx.post(f"{s.url}/v1/chat/completions", headers=ok,
                          json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.json()["choices"]
    public = httpx.get(f"{s.url}/cluster/status_json")
    assert public.status_code == 200
    assert "t0ken-s3cret" not in public.text and "--join-token <token>" in public.text
    assert httpx.get(f"{s.url}/model/list").status_code == 200
    # the API key is also the operator's credential: it reveals the join command
    assert "--join-token t0ken-s3cret" in httpx.get(f"{s.url}/cluster/status_json",
                                                    headers=ok).text


def test_cluster_status_stream_emits_on_change(scheduler, nodes):
    s = scheduler()
    with httpx.Client(timeout=5) as client, \
            client.stream("GET", f"{s.url}/cluster/status") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        first = json.loads(next(lines)[6:])
        assert first["type"] == "cluster_status" and first["data"]["node_list"] == []
        s.join("a", WHOLE)
        for _ in range(20):
            event = json.loads(next(lines)[6:])["data"]
            if event["node_list"]:
                break
        assert event["node_list"][0]["node_id"] == "a"
        started = time.monotonic()
        json.loads(next(lines)[6:])  # nothing changes: still an event within ~2 s
        assert time.monotonic() - started < 3


def test_model_list_and_join_command_shapes(scheduler, nodes):
    s = scheduler()
    listing = s.http.get("/model/list").json()
    assert listing["type"] == "model_list"
    assert [e["name"] for e in listing["data"]] == ["test-model", "other-model"]
    entry = listing["data"][0]
    assert entry["num_layers"] == 8 and entry["dtype"] == "float32"
    assert entry["memory_gb"] > entry["weights_gb"] > 0
    command = s.http.get("/node/join/command").json()
    assert command["data"]["command"] == f"parallax join -s 127.0.0.1:{s.config.port}"


def test_catalog_sizes_curated_ids_without_the_network():
    catalog = ModelCatalog(curated={"Qwen/Qwen3-0.6B": CURATED_CONFIGS["Qwen/Qwen3-0.6B"]},
                           include_builtin=False)
    fp32 = catalog.spec("Qwen/Qwen3-0.6B")
    assert fp32.num_layers == 28 and fp32.tie_word_embeddings
    assert 0.55e9 < fp32.total_bytes / 4 < 0.65e9  # ~0.6 B parameters (tied embedding once)
    bf16 = ModelCatalog("bfloat16", curated=catalog.curated, include_builtin=False)
    assert bf16.spec("Qwen/Qwen3-0.6B").layer_bytes * 2 == fp32.layer_bytes
    assert [e["name"] for e in catalog.entries()] == ["Qwen/Qwen3-0.6B"]
    with pytest.raises(ValueError):
        catalog.spec("not a model")


def test_stream_peek_sees_done_errors_and_metrics_across_chunk_borders():
    data = _chunk("r", {"content": "x"}) + _chunk("r", {}, "stop", metrics=METRICS) + DONE
    peek, finals = StreamPeek(), []
    for i in range(0, len(data), 7):
        finals += peek.feed(data[i:i + 7])
    assert peek.done and peek.error is None and finals[0]["metrics"] == METRICS
    peek = StreamPeek()
    peek.feed(encode_event(error_body(500, "boom")))
    assert peek.error["code"] == 500 and not peek.done


def test_run_command_builds_the_scheduler_config():
    args = build_parser().parse_args(
        ["run", "-m", "test-model", "-n", "3", "--host", "0.0.0.0", "--join-token", "t",
         "--api-key", "k", "--retry-attempts", "4", "--retry-interval", "0.5",
         "--heartbeat-timeout", "9", "--dtype", "bfloat16", "--no-mdns"])
    assert args.command == "run" and args.init_nodes_num == 3 and args.no_mdns
    with pytest.raises(ConfigError):
        SchedulerConfig(retry_attempts=-1)
    with pytest.raises(ConfigError):
        SchedulerConfig(dtype="float16")
    assert SchedulerConfig(heartbeat_timeout_s=9).heartbeat_interval_s == 3


def test_a_loading_nodes_hub_download_shows_in_the_cluster_view(scheduler):
    s = scheduler()
    s.join("a", 4000)
    download = {"done_bytes": 300, "total_bytes": 1000, "bytes_per_s": 150.0, "eta_s": 4.67}
    s.heartbeat("a", download=download)
    node = s.status()["node_list"][0]
    assert node["download"] == {**download, "bytes_per_s": 150, "eta_s": 4.7}
    s.heartbeat("a", download={**download, "done_bytes": 2000})  # nonsense is not shown
    assert s.status()["node_list"][0]["download"] is None


def test_a_conversations_turns_stay_on_the_pipeline_holding_its_prefix(scheduler, nodes):
    """Cache-aware routing (issue 15): round-robin would alternate pipelines between requests;
    each turn of a chat goes back to the head that served its history instead."""
    s = scheduler()
    s.bring_up({"a": HALF, "b": HALF, "c": HALF, "d": HALF})
    assert len(s.status()["ready_pipelines"]) == 2
    messages: list[dict] = []
    heads = []
    for turn in range(3):
        messages.append({"role": "user", "content": f"turn {turn}"})
        assert s.chat(messages=messages).status_code == 200
        heads.append(nodes.heads()[-1])
        messages.append({"role": "assistant", "content": "ok"})
    assert len(set(heads)) == 1, heads
    assert s.chat("a new conversation").status_code == 200
    assert nodes.heads()[-1] != heads[0]  # new conversations still spread


def test_heartbeats_carry_link_measurements_validated(scheduler, nodes):
    s = scheduler(init_nodes_num=2)
    s.bring_up({"a": 300, "b": 300, "c": 300})
    answer = s.heartbeat("a")
    listed = [p[0] for p in answer["probe_peers"]]
    assert sorted(listed) == ["b", "c"]  # everyone else, never itself
    assert all(p[1] == nodes.url(p[0]) for p in answer["probe_peers"])
    network = s.state.registry.network
    s.heartbeat("a", scheduler_rtt_ms=3.0,
                links=[["b", 12.0, 80.0], ["c", -4.0, 1.0], ["ghost", 1.0, 1.0]])
    s.heartbeat("b", links=[["a", 20.0, 50.0]])
    assert network.link("a", "b").rtt_ms == 20.0 and network.link("a", "b").bandwidth_mbps == 50
    assert ("a", "c") not in network.reports and ("a", "ghost") not in network.reports
    too_many = [[f"x{i}", 1.0, 1.0] for i in range(17)]
    s.heartbeat("c", links=too_many)  # the heartbeat is still answered; the links are dropped
    assert not any(k[0] == "c" for k in network.reports)
    s.leave("b")
    assert not any("b" in k for k in network.reports)


def test_the_head_gets_the_validated_request_normalized(scheduler, nodes):
    s = scheduler()
    s.bring_up({"a": WHOLE})
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
    response = s.chat(stream=False, messages=[{"role": "user", "content": parts}],
                      max_completion_tokens=7, stop="x", user="someone", metadata={"k": "v"})
    assert response.status_code == 200
    body = nodes.received[-1][1]
    assert body["messages"] == [{"role": "user", "content": "hi\nthere"}]
    assert body["max_tokens"] == 7 and body["stop"] == ["x"] and body["stream"] is True
    assert not {"user", "metadata", "max_completion_tokens", "model"} & body.keys()
