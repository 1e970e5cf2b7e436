"""A fake scheduler for the front-door tests: the scheduler's HTTP surface, scripted answers.

Runs a real uvicorn server on 127.0.0.1 (free port) in a thread. The reply to a chat request is
chosen by the last user message:

- contains "think"    → reasoning_content chunks, then the answer
- contains "xss"      → an answer holding `<img src=x onerror=alert(1)>`
- contains "markdown" → an answer with a code block, a list and a table
- contains "endless"  → a token every 50 ms until the client goes away (bounded: 400 tokens)
- contains "boom"     → an error event inside the stream, then [DONE]
- anything else       → "Hello **world**, this is a streamed answer." token by token

Every stream is bounded in count and time, so no test can hang on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from parallax.serving.errors import error_body
from parallax.serving.sse import DONE, encode_event

XSS = "<img src=x onerror=alert(1)>"
HELLO_TOKENS = ["Hello", " **world**", ",", " this", " is", " a", " streamed", " answer", "."]
THINK_TOKENS = ["Let", " me", " think", " about", " it", "."]
MARKDOWN_ANSWER = ("Here is code:\n\n```python\nprint('<b>hi</b>')\n```\n\n- one\n- *two*\n\n"
                   "| a | b |\n|---|---|\n| 1 | `x` |\n")
ENDLESS_LIMIT = 400


class FakeScheduler:
    """State and app of the fake; `url` once started."""

    def __init__(self, *, model_name: str | None = "tiny-model", api_key: str | None = None,
                 init_nodes_num: int = 1, token_delay_s: float = 0.05) -> None:
        self.model_name = model_name
        self.api_key = api_key
        self.init_nodes_num = init_nodes_num
        self.token_delay_s = token_delay_s
        self.nodes: list[dict[str, Any]] = []
        self.force_status: int | None = None  # answer chat requests with this error status
        self.auth_headers: list[str | None] = []
        self.chat_bodies: list[dict[str, Any]] = []
        self.init_bodies: list[dict[str, Any]] = []
        self.endless_started = threading.Event()
        self.endless_closed = threading.Event()
        self.endless_sent = 0
        self.app = self._build()
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ---- cluster state ---------------------------------------------------------------------

    def add_node(self, name: str = "Fake GPU") -> None:
        """A node joins; the allocation gives nodes equal shares of 24 layers."""
        node_id = f"node-{len(self.nodes) + 1}"
        self.nodes.append({"node_id": node_id, "status": "ready", "device": "cuda",
                           "device_name": name, "memory_gb": 24.0, "start_layer": None,
                           "end_layer": None, "running_requests": 0, "gflops": 1000.0,
                           "layer_latency_ms": 1.5, "ms_per_token": None})
        if len(self.nodes) >= self.init_nodes_num:
            share = 24 // len(self.nodes)
            for i, node in enumerate(self.nodes):
                node["start_layer"] = i * share
                node["end_layer"] = 24 if i == len(self.nodes) - 1 else (i + 1) * share

    def status(self) -> dict[str, Any]:
        ready = self.model_name is not None and len(self.nodes) >= self.init_nodes_num
        return {"type": "cluster_status", "data": {
            "status": "available" if ready else "waiting",
            "model_name": self.model_name,
            "init_nodes_num": self.init_nodes_num,
            "need_more_nodes": self.model_name is not None and not ready,
            "node_join_command": "parallax join -s 127.0.0.1:3001",
            "max_running_request": 8,
            "node_list": self.nodes,
            "pipelines": [[n["node_id"] for n in self.nodes]] if ready else [],
        }}

    # ---- app -------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/model/list")
        async def model_list() -> dict[str, Any]:
            return {"type": "model_list", "data": [
                {"name": "tiny-model", "memory_gb": 0.5, "num_layers": 24},
                {"name": "big-model", "memory_gb": 140.0, "num_layers": 80}]}

        @app.post("/scheduler/init")
        async def init(request: Request) -> dict[str, Any]:
            body = await request.json()
            self.init_bodies.append(body)
            self.model_name = body["model_name"]
            self.init_nodes_num = body.get("init_nodes_num", 1)
            return {"type": "scheduler_init", "data": body}

        @app.get("/node/join/command")
        async def join_command() -> dict[str, Any]:
            return {"type": "node_join_command",
                    "data": {"command": "parallax join -s 127.0.0.1:3001"}}

        @app.get("/cluster/status_json")
        async def status_json() -> dict[str, Any]:
            return self.status()

        @app.get("/cluster/status")
        async def status_stream() -> StreamingResponse:
            async def events() -> AsyncIterator[bytes]:
                for _ in range(600):  # at most ~2 minutes
                    yield encode_event(self.status())
                    await asyncio.sleep(0.2)
            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            header = request.headers.get("authorization")
            self.auth_headers.append(header)
            if self.api_key is not None:
                scheme, _, key = (header or "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(key, self.api_key):
                    return JSONResponse(status_code=401,
                                        content=error_body(401, "missing or wrong API key"))
            if self.force_status is not None:
                return JSONResponse(status_code=self.force_status,
                                    content=error_body(self.force_status, "forced error"))
            body = await request.json()
            self.chat_bodies.append(body)
            last = next((m.get("content", "") for m in reversed(body.get("messages", []))
                         if m.get("role") == "user"), "")
            return StreamingResponse(self._script(str(last)), media_type="text/event-stream")

        return app

    def _chunk(self, delta: dict[str, Any], n: int, finish: str | None = None,
               metrics: dict[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
            "model": self.model_name or "default",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
        }
        if metrics is not None:
            chunk["metrics"] = metrics
        return encode_event(chunk)

    async def _script(self, prompt: str) -> AsyncIterator[bytes]:
        delay = self.token_delay_s
        yield self._chunk({"role": "assistant", "content": ""}, 0)
        if "endless" in prompt:
            self.endless_started.set()
            try:
                for n in range(1, ENDLESS_LIMIT + 1):
                    await asyncio.sleep(delay)
                    self.endless_sent = n
                    yield self._chunk({"content": f" tok{n}"}, n)
            finally:
                self.endless_closed.set()
            yield DONE
            return
        if "boom" in prompt:
            yield self._chunk({"content": "partial"}, 1)
            yield encode_event(error_body(500, "the pipeline broke"))
            yield DONE
            return
        n = 0
        if "think" in prompt:
            for token in THINK_TOKENS:
                n += 1
                await asyncio.sleep(delay)
                yield self._chunk({"reasoning_content": token}, n)
        if "xss" in prompt:
            tokens = ["Look: ", XSS, " done"]
        elif "markdown" in prompt:
            tokens = [MARKDOWN_ANSWER[i:i + 7] for i in range(0, len(MARKDOWN_ANSWER), 7)]
        else:
            tokens = HELLO_TOKENS
        for token in tokens:
            n += 1
            await asyncio.sleep(delay)
            yield self._chunk({"content": token}, n)
        yield self._chunk({}, n, finish="stop",
                          metrics={"ttft_ms": 12.5, "tps": 42.0, "duration_ms": 250.0})
        yield DONE

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeScheduler:
        self._server, self._thread, self.url = start_server(self.app)
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_server(self._server, self._thread)


def start_server(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, str]:
    """Serve `app` on 127.0.0.1:<free port> in a daemon thread; returns (server, thread, url)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


def stop_server(server: uvicorn.Server, thread: threading.Thread | None) -> None:
    server.should_exit = True
    if thread is not None:
        thread.join(timeout=5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5)


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Context manager: `app` served on a free loopback port; yields its base URL."""
    server, thread, url = start_server(app)
    try:
        yield url
    finally:
        stop_server(server, thread)
