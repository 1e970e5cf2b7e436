"""Running one of our HTTP servers: the uvicorn server every command uses, its signal handling,
and the operator's start-up lines. No torch import: `parallax chat` and `parallax gateway` run
on machines that are not nodes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from parallax.net import bind_socket, url_host
from parallax.serving.tls import NO_TLS, TLSConfig


def say(text: str) -> None:
    """One line of start-up progress for the operator."""
    print(f"[parallax] {text}", file=sys.stderr, flush=True)


class Server(uvicorn.Server):
    """uvicorn without its own signal handling: `install_signal_handlers` owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def make_server(app: FastAPI, tls: TLSConfig = NO_TLS, lifespan: str = "on") -> Server:
    """The uvicorn server of every command (https when `tls` has a certificate)."""
    return Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3,
                                 lifespan=lifespan, **tls.uvicorn_kwargs()))


def install_signal_handlers(server: uvicorn.Server,
                            on_stop: Callable[[], None] | None = None) -> None:
    """SIGINT/SIGTERM stop the server gracefully (calling `on_stop` first); a second one
    forces the exit."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if server.should_exit:
            server.force_exit = True
        elif on_stop is not None:
            on_stop()
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)


async def serve_app(app: FastAPI, host: str, port: int, banner: str,
                    tls: TLSConfig = NO_TLS) -> int:
    """Serve `app` on host:port until SIGINT/SIGTERM; `banner` gets `{url}` filled in."""
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    server = make_server(app, tls)
    install_signal_handlers(server)
    say(banner.format(url=f"{tls.scheme}://{url_host(host)}:{bound_port}"))
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
    return 0
