"""Who may do what, in one place: operator checks, the relayed-request marker, Bearer parsing,
body caps, address validation and the Host / security-header middleware every server installs.

The trust rules (ARCHITECTURE.md, "Trust"):

- The **operator** is whoever sends the API key as `Authorization: Bearer <key>`; when the
  server has no key, only a client on a *direct* loopback connection. A request relayed by the
  project's own proxies (`parallax chat`, the P2P bridge) reaches the server from 127.0.0.1 on
  behalf of someone else, so those proxies mark it (`X-Parallax-Relayed`, replacing any copy the
  client sent) and a marked request never counts as loopback: it is the operator only with the
  key. The proxies pass on the caller's own `Authorization`, never one of their own.
- A server bound to loopback answers only requests whose `Host` is a loopback name (a web page
  elsewhere cannot reach it through DNS rebinding); one bound elsewhere answers the hosts in its
  `--allowed-hosts` list (default: any), loopback names always included.
- Every answer carries CSP (`frame-ancestors 'none'`), `X-Frame-Options: DENY` and
  `X-Content-Type-Options: nosniff`, so no page of ours can be framed (clickjacking).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parallax.net import is_loopback_host
from parallax.serving.errors import APIError, check_secret, error_body

# set by parallax chat's forwarder and the P2P bridge on every request they relay
RELAYED_HEADER = "x-parallax-relayed"
# bodies of the control endpoints (/scheduler/init, /node/*) are small: cap them tightly
CONTROL_BODY_LIMIT = 64 * 2**10

CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                           "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                           "base-uri 'none'; form-action 'self'")
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


# ---- credentials ------------------------------------------------------------------------------


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), else None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def has_bearer(headers: Mapping[str, str], secret: str) -> bool:
    """True when the request sends `secret` as its Bearer token (constant-time compare)."""
    return check_secret(bearer_token(headers), secret)


def is_relayed(request: Request) -> bool:
    """The request came through one of our proxies (it carries the relayed marker)."""
    return RELAYED_HEADER in request.headers


def is_direct_loopback(request: Request) -> bool:
    """A client on this machine talking to us directly (not through one of our proxies)."""
    client = request.client
    return client is not None and is_loopback_host(client.host) and not is_relayed(request)


def is_operator(request: Request, api_key: str | None) -> bool:
    """The API key as Bearer when the server has one; else a direct loopback client."""
    if api_key is not None:
        return has_bearer(request.headers, api_key)
    return is_direct_loopback(request)


def require_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request sends the API key (when the server has one)."""
    if api_key is not None and not has_bearer(request.headers, api_key):
        raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`")


def require_operator(request: Request, api_key: str | None, action: str) -> None:
    """401/403 unless the caller is the operator (see :func:`is_operator`)."""
    if is_operator(request, api_key):
        return
    if api_key is not None:
        raise APIError(401, f"{action} needs the operator's API key: send "
                            "`Authorization: Bearer <key>`")
    raise APIError(403, f"{action} is allowed only from the scheduler's own machine (a direct "
                        "connection to 127.0.0.1), since this scheduler has no API key; start "
                        "it with --api-key to allow it from elsewhere with that key")


def mark_relayed(headers: Iterable[tuple[str, str]], via: str) -> list[tuple[str, str]]:
    """`headers` without any client-supplied relayed marker, plus ours (`via` names the proxy)."""
    return [*((k, v) for k, v in headers if k.lower() != RELAYED_HEADER), (RELAYED_HEADER, via)]


# ---- request bodies ---------------------------------------------------------------------------


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON: a cross-site form or `text/plain` POST (which a
    browser sends without asking) is refused before anything is read."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"send the body as JSON with `Content-Type: application/json` "
                            f"(got {media or 'no content type'!r})")


async def read_body_capped(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it exceeds `limit` bytes: by Content-Length, or
    while a chunked body streams in (never reading more than `limit` + one chunk)."""
    too_large = APIError(413, f"the request body exceeds the limit of {limit} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


# ---- addresses --------------------------------------------------------------------------------


def is_host_port_url(url: str, schemes: tuple[str, ...]) -> bool:
    """True for exactly `scheme://host:port` (a trailing "/" allowed): no userinfo, path,
    query or fragment; scheme in `schemes`; host a name or IP literal; port in 1..65535."""
    if not isinstance(url, str) or len(url) > 300:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme not in schemes or parts.path not in ("", "/") or parts.query \
            or parts.fragment or "?" in url or "#" in url:
        return False
    match = _HOST_PORT.match(parts.netloc)
    return match is not None and 0 < int(match.group(2)) <= 65535


# ---- Host check and security headers ----------------------------------------------------------


def _host_name(value: str) -> str:
    """The host part of a Host header value (port and IPv6 brackets dropped), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class SecurityMiddleware:
    """Pure ASGI middleware: refuse requests for a Host this server does not answer (400 with
    the error body), and add the security headers to every response."""

    def __init__(self, app: ASGIApp, bind_host: str,
                 allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.loopback_only = is_loopback_host(bind_host)
        self.allowed = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request with this Host header value is answered."""
        if host is None:
            return False
        name = _host_name(host)
        if is_loopback_host(name):
            return True
        return not self.loopback_only and (not self.allowed or name in self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (no server here speaks websockets)
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                extra = [h for h in SECURITY_HEADERS if h[0] not in present]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"),
                    None)
        if not self.host_allowed(host):
            await JSONResponse(status_code=400, content=error_body(400, self._refusal(host)))(
                scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, host: str | None) -> str:
        if self.loopback_only:
            return (f"this server listens on loopback and answers only requests for localhost "
                    f"or 127.0.0.1, not Host {host!r}; open it as http://127.0.0.1:<port>")
        return (f"Host {host!r} is not in this server's --allowed-hosts list; add it there or "
                "use one of the listed names")


def install_security(app, bind_host: str, allowed_hosts: Iterable[str] = ()) -> None:
    """Install :class:`SecurityMiddleware` on a FastAPI/Starlette app (call it last, so it is
    the outermost layer and its headers cover every answer, errors included)."""
    app.add_middleware(SecurityMiddleware, bind_host=bind_host, allowed_hosts=tuple(allowed_hosts))
