"""`parallax gateway`: the backend of a phone app, in front of the scheduler.

Every request must carry `Authorization: Bearer <password>` (compared in constant time; checked
before routing, so unknown paths answer 401 too). A client that sends wrong passwords too often
is answered 429 for a while (parallax/gateway/backoff.py). Toward the scheduler the gateway
sends its own API key, if it has one: the phone only knows the gateway password.

- `POST /chat {"prompt"} | {"messages"}` → `{"response", "finish_reason", "reasoning"?,
  "metrics"}`; the scheduler is always asked for a stream, so the time to first token is real.
- `POST /chat/stream` → the scheduler's OpenAI chunks as they arrive, `[DONE]` at the end.
- `GET /cluster/status` → `{"status", "nodes", "model"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from parallax.config import GatewayConfig
from parallax.gateway.backoff import AuthFailureLimiter, client_key, insecure_bind_warning
from parallax.serving import sse
from parallax.serving.errors import APIError, error_body, install_error_handlers
from parallax.serving.openai_schemas import parse_json_body
from parallax.serving.proxy import (
    make_client,
    open_upstream,
    scheduler_url,
    stream_body,
    unreachable,
)
from parallax.serving.runner import serve_app
from parallax.serving.security import (
    bearer_token,
    has_bearer,
    install_security,
    mark_relayed,
    read_body_capped,
)
from parallax.serving.sse import DONE_MARKER, aparse_sse_lines

_ROUND = 2


class PasswordMiddleware:
    """Pure ASGI middleware: 401 with the error body unless `Authorization: Bearer <password>`;
    429 with `Retry-After` while the client is blocked for too many wrong passwords."""

    def __init__(self, app: ASGIApp, password: str, limiter: AuthFailureLimiter) -> None:
        self.app = app
        self.password = password
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = client_key((scope.get("client") or (None,))[0])
        wait = self.limiter.retry_after(client)
        headers = Headers(scope=scope)
        if wait is not None:
            response = JSONResponse(status_code=429, headers={"Retry-After": str(wait)},
                                    content=error_body(429, f"too many wrong passwords from "
                                                            f"this address; retry in {wait} s"))
        elif not has_bearer(headers, self.password):
            if bearer_token(headers) is not None:  # a guess, not a forgotten header
                self.limiter.failed(client)
            response = JSONResponse(
                status_code=401, headers={"WWW-Authenticate": "Bearer"},
                content=error_body(401, "missing or wrong password: send "
                                        "`Authorization: Bearer <password>`"))
        else:
            self.limiter.succeeded(client)
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def build_upstream_request(body: Any) -> dict[str, Any]:
    """The scheduler request for a gateway body `{"prompt"} | {"messages"}` (+ options)."""
    if not isinstance(body, dict):
        raise APIError(400, 'expected a JSON object {"prompt": "..."} or {"messages": [...]}')
    prompt, messages = body.get("prompt"), body.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content}")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string")
            messages = [*messages, {"role": "user", "content": prompt}]
    elif isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    else:
        raise APIError(400, "send a non-empty 'prompt' string or a 'messages' list")
    request: dict[str, Any] = {"messages": messages, "stream": True,
                               "stream_options": {"include_usage": True}}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                 "chat_template_kwargs"):
        if body.get(name) is not None:
            request[name] = body[name]
    return request


async def _relay_error(upstream: httpx.Response) -> APIError:
    """An APIError for a non-200 upstream answer (its message kept when it has one)."""
    try:
        raw = await upstream.aread()
    finally:
        await upstream.aclose()
    message = f"the scheduler answered {upstream.status_code}"
    with contextlib.suppress(ValueError):
        data = httpx.Response(200, content=raw).json()
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            message = data["message"]
    if upstream.status_code == 401:  # the gateway's key, not the phone's password, was refused
        return APIError(502, f"the scheduler refused the gateway's API key "
                             f"(--api-key / PARALLAX_API_KEY): {message}")
    return APIError(upstream.status_code, message)


async def assemble(upstream: httpx.Response, started: float) -> dict[str, Any]:
    """Read a scheduler stream to the end → the `/chat` answer (text, reasoning, metrics)."""
    parts: list[str] = []
    thinking: list[str] = []
    usage: dict[str, Any] = {}
    server_metrics: dict[str, Any] = {}
    first_token_at: float | None = None
    finish_reason = None
    try:
        async for event in aparse_sse_lines(upstream.aiter_lines()):
            if event == DONE_MARKER or not isinstance(event, dict):
                continue
            if event.get("object") == "error":
                code = event.get("code") if isinstance(event.get("code"), int) else 500
                raise APIError(code, str(event.get("message", "error in the stream")))
            usage = event.get("usage") or usage
            server_metrics = event.get("metrics") or server_metrics
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                text, reasoning = delta.get("content"), delta.get("reasoning_content")
                if (text or reasoning) and first_token_at is None:
                    first_token_at = time.perf_counter()
                if text:
                    parts.append(text)
                if reasoning:
                    thinking.append(reasoning)
                finish_reason = choice.get("finish_reason") or finish_reason
    except httpx.HTTPError as exc:
        raise unreachable(exc, str(upstream.request.url)) from None
    finally:
        await upstream.aclose()
    duration_ms = (time.perf_counter() - started) * 1000
    completion = int(usage.get("completion_tokens") or 0)
    ttft_ms = server_metrics.get("ttft_ms")
    if ttft_ms is None:
        ttft_ms = ((first_token_at or time.perf_counter()) - started) * 1000
    tps = server_metrics.get("tps")
    if tps is None:
        decode_s = (duration_ms - ttft_ms) / 1000
        tps = completion / decode_s if completion > 1 and decode_s > 0 else 0.0
    metrics = {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": completion,
        "total_tokens": int(usage.get("total_tokens") or 0),
        "ttft_ms": round(float(ttft_ms), _ROUND),
        "tps": round(float(tps), _ROUND),
        "duration_ms": round(float(server_metrics.get("duration_ms") or duration_ms), _ROUND),
    }
    answer: dict[str, Any] = {"response": "".join(parts), "finish_reason": finish_reason,
                              "metrics": metrics}
    if thinking:
        answer["reasoning"] = "".join(thinking)
    return answer


def build_gateway_app(config: GatewayConfig,
                      clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """The FastAPI app of `parallax gateway` (password check and its backoff included;
    `clock` times the backoff window: tests pass their own)."""
    assert config.password  # GatewayConfig refuses to exist without one
    relayed = dict(mark_relayed((), "gateway"))  # never the scheduler machine's operator
    upstream_headers = {"Content-Type": "application/json", "Accept": sse.MEDIA_TYPE,
                        **relayed}
    if config.api_key:
        upstream_headers["Authorization"] = f"Bearer {config.api_key}"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.client.aclose()

    app = FastAPI(title="Parallax gateway", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.client = make_client(scheduler_url(config.scheduler, config.tls),
                                   config.connect_timeout_s, config.read_timeout_s,
                                   tls=config.tls)
    install_error_handlers(app)

    async def open_chat(request: Request) -> httpx.Response:
        payload = build_upstream_request(parse_json_body(
            await read_body_capped(request, config.max_body_bytes)))
        upstream = await open_upstream(app.state.client, "POST", "/v1/chat/completions",
                                       headers=upstream_headers, json=payload)
        if upstream.status_code != 200:
            raise await _relay_error(upstream)
        return upstream

    @app.post("/chat")
    async def chat(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        return await assemble(await open_chat(request), started)

    @app.post("/chat/stream")
    async def chat_stream(request: Request) -> Response:
        upstream = await open_chat(request)
        return StreamingResponse(stream_body(upstream, sse=True), media_type=sse.MEDIA_TYPE,
                                 headers=sse.HEADERS)

    @app.get("/cluster/status")
    async def cluster_status() -> dict[str, Any]:
        try:
            response = await app.state.client.get("/cluster/status_json", headers=relayed)
        except httpx.HTTPError as exc:
            raise unreachable(exc, str(app.state.client.base_url)) from None
        if response.status_code != 200:
            raise APIError(502, f"the scheduler answered {response.status_code} for its status")
        data = response.json()
        data = data.get("data", data) if isinstance(data, dict) else {}
        return {"status": data.get("status", "unknown"),
                "nodes": len(data.get("node_list") or ()),
                "model": data.get("model_name")}

    limiter = AuthFailureLimiter(config.max_failed_auth, config.failed_auth_window_s, clock=clock)
    app.add_middleware(PasswordMiddleware, password=config.password, limiter=limiter)
    install_security(app, config.host, config.allowed_hosts)  # outermost: before the password
    return app


def run_gateway(config: GatewayConfig) -> int:
    """Blocking entry used by the CLI."""
    app = build_gateway_app(config)
    warning = insecure_bind_warning(config.host, config.tls.serves_tls)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    key = "with an API key" if config.api_key else "without an API key"
    banner = (f"Parallax gateway on {{url}} (scheduler: "
              f"{scheduler_url(config.scheduler, config.tls)}, "
              f"{key}); every request needs `Authorization: Bearer <password>`")
    return asyncio.run(serve_app(app, config.host, config.port, banner, config.tls))
