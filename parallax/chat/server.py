"""`parallax chat`: serve the web UI and proxy its API calls to the scheduler.

Every proxied call passes the client's `Authorization` header through (the scheduler's API key
is the user's business, not this server's), streams bytes as they arrive and closes the upstream
response when the client goes away. A scheduler that cannot be reached answers 503. Every call
is marked as relayed, so the scheduler never takes it for its own machine's operator: without
the API key the setup is refused and the join command shows a placeholder for the token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response

from parallax.config import ChatConfig
from parallax.p2p.peer import is_p2p_target
from parallax.serving.errors import install_error_handlers
from parallax.serving.proxy import forward, make_client, scheduler_url
from parallax.serving.runner import serve_app
from parallax.serving.security import install_security
from parallax.web import mount_web_ui

# (method, path, read timeout override or None for the client default)
PROXIED_ROUTES: tuple[tuple[str, str, float | None], ...] = (
    ("POST", "/v1/chat/completions", None),
    ("POST", "/v1/completions", None),
    ("POST", "/v1/responses", None),
    ("GET", "/v1/models", None),
    ("GET", "/cluster/status", None),  # SSE; the scheduler sends at least every 2 s
    ("GET", "/cluster/status_json", None),
    ("GET", "/model/list", None),
    ("GET", "/node/join/command", None),
    ("POST", "/scheduler/init", 90.0),  # sizing a model may take a while
)


def build_chat_app(config: ChatConfig) -> FastAPI:
    """The FastAPI app of `parallax chat`."""
    p2p, transport, base = None, None, None
    if is_p2p_target(config.scheduler):
        from parallax.p2p.bridge import LatticaTransport
        from parallax.p2p.roles import start_client_peer

        p2p, scheduler_peer_id = start_client_peer(config.p2p_port, config.scheduler,
                                                   config.relays)
        transport, base = LatticaTransport(p2p.peer, scheduler_peer_id), "http://scheduler.p2p"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.client.aclose()
        if p2p is not None:
            p2p.close()

    app = FastAPI(title="Parallax chat", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.client = make_client(base or scheduler_url(config.scheduler, config.tls),
                                   config.connect_timeout_s, config.read_timeout_s,
                                   transport=transport, tls=config.tls)
    install_error_handlers(app)

    def route(path: str, read_timeout_s: float | None):
        async def proxy(request: Request) -> Response:
            return await forward(request, app.state.client, path,
                                 max_body_bytes=config.max_body_bytes,
                                 read_timeout_s=read_timeout_s)
        return proxy

    for method, path, read_timeout_s in PROXIED_ROUTES:
        app.add_api_route(path, route(path, read_timeout_s), methods=[method],
                          include_in_schema=False)
    mount_web_ui(app)
    install_security(app, config.host, config.allowed_hosts)
    return app


def run_chat(config: ChatConfig) -> int:
    """Blocking entry used by the CLI."""
    app = build_chat_app(config)
    target = config.scheduler if is_p2p_target(config.scheduler) else scheduler_url(
        config.scheduler, config.tls)  # a peer id / multiaddr is shown as given
    banner = (f"Parallax chat on {{url}} (scheduler: {target}); "
              f"Ctrl-C stops it")
    return asyncio.run(serve_app(app, config.host, config.port, banner, config.tls))
