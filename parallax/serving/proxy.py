"""Forwarding HTTP requests to the scheduler (used by `parallax chat` and `parallax gateway`).

Streams are passed through as their bytes arrive; when the client goes away Starlette cancels the
response's body iterator and the upstream response is closed with it, so the scheduler sees the
disconnect too. A scheduler that cannot be reached answers 503 with the OpenAI error body.

No torch import: these servers run on machines that are not nodes (their runner:
parallax/serving/runner.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from parallax.serving.errors import APIError, error_body
from parallax.serving.security import mark_relayed, read_body_capped
from parallax.serving.sse import DONE, MEDIA_TYPE, encode_event
from parallax.serving.tls import NO_TLS, TLSConfig, with_scheme

logger = logging.getLogger(__name__)

# request headers worth forwarding upstream (the caller's own Authorization, nothing of ours);
# hop-by-hop and host headers are dropped, and the relayed marker is added
FORWARD_REQUEST_HEADERS = ("authorization", "content-type", "accept", "x-request-id")
# response headers worth passing back; length/encoding are recomputed by our server
FORWARD_RESPONSE_HEADERS = ("content-type", "cache-control", "x-request-id", "retry-after",
                            "www-authenticate")


def scheduler_url(address: str, tls: TLSConfig = NO_TLS) -> str:
    """`HOST:PORT` (or a full http(s) URL) → base URL without a trailing slash; https when
    `tls` names a CA file to check the scheduler with (an https URL is never downgraded)."""
    return with_scheme(address, tls.ca_file is not None)


def make_client(base_url: str, connect_timeout_s: float, read_timeout_s: float,
                transport: httpx.AsyncBaseTransport | None = None,
                tls: TLSConfig = NO_TLS) -> httpx.AsyncClient:
    """The one upstream client of a proxy server: timeouts on every call, no env proxies,
    certificates checked against `tls`'s CA file (or the system's)."""
    timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s,
                            write=connect_timeout_s, pool=connect_timeout_s)
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False,
                             transport=transport,  # P2P mode: a LatticaTransport
                             verify=tls.client_verify(),
                             limits=httpx.Limits(max_connections=1000,
                                                 max_keepalive_connections=50))


def unreachable(exc: Exception, target: str) -> APIError:
    """The 503 answered when the scheduler cannot be reached (or stops answering)."""
    what = "did not answer in time" if isinstance(exc, httpx.TimeoutException) else "is unreachable"
    return APIError(503, f"the scheduler at {target} {what} ({type(exc).__name__})")


def _pass_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() in FORWARD_RESPONSE_HEADERS}


async def open_upstream(client: httpx.AsyncClient, method: str, path: str, *,
                        headers: dict[str, str] | None = None, content: bytes | None = None,
                        json: object = None, read_timeout_s: float | None = None,
                        ) -> httpx.Response:
    """Send a request upstream with streaming on; raises APIError(503) when unreachable."""
    extra = {}
    if read_timeout_s is not None:
        extra["timeout"] = httpx.Timeout(client.timeout.connect, read=read_timeout_s,
                                         write=client.timeout.write, pool=client.timeout.pool)
    request = client.build_request(method, path, headers=headers, content=content, json=json,
                                   **extra)
    try:
        return await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise unreachable(exc, str(client.base_url)) from None


async def stream_body(upstream: httpx.Response, *, sse: bool,
                      on_done: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    """Yield the upstream body as it arrives; always close the upstream response.

    When an SSE stream breaks off (read timeout, connection lost) before `[DONE]`, a final error
    event and `[DONE]` are added, so clients see a well-formed end.
    """
    tail = b""
    try:
        async for chunk in upstream.aiter_raw():
            if chunk:
                tail = (tail + chunk)[-64:]
                yield chunk
    except httpx.HTTPError as exc:
        logger.warning("upstream stream broke off: %r", exc)
        if sse and DONE.strip() not in tail:
            yield encode_event(error_body(503, f"the scheduler stream broke off "
                                               f"({type(exc).__name__})"))
            yield DONE
    finally:
        await upstream.aclose()
        if on_done is not None:
            on_done()


async def forward(request: Request, client: httpx.AsyncClient, path: str, *,
                  max_body_bytes: int, read_timeout_s: float | None = None,
                  via: str = "chat") -> Response:
    """Forward `request` (method, body up to `max_body_bytes`, selected headers, query) to
    `path` on the scheduler, marked as relayed by `via` (so it never counts as loopback)."""
    headers = dict(mark_relayed(
        ((k, v) for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST_HEADERS),
        via))
    body = await read_body_capped(request, max_body_bytes) \
        if request.method in ("POST", "PUT", "PATCH") else None
    if request.url.query:
        path = f"{path}?{request.url.query}"
    upstream = await open_upstream(client, request.method, path, headers=headers, content=body,
                                   read_timeout_s=read_timeout_s)
    content_type = upstream.headers.get("content-type", "")
    sse = content_type.startswith(MEDIA_TYPE)
    return StreamingResponse(stream_body(upstream, sse=sse), status_code=upstream.status_code,
                             headers=_pass_headers(upstream), media_type=None)
