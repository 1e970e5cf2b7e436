"""`parallax run`: size the model, start the HTTP server, advertise it by mDNS, run until stopped."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import sys

import httpx
import uvicorn

from parallax.config import SchedulerConfig
from parallax.net import lan_address
from parallax.p2p.peer import peer_addresses
from parallax.protocol.p2p import SchedulerRecord
from parallax.scheduler.app import SchedulerState, build_app
from parallax.scheduler.status import p2p_join_command

logger = logging.getLogger("parallax.scheduler")


def _start_advertising(config: SchedulerConfig, model: str | None):
    from parallax.scheduler.discovery import Advertiser

    try:
        return Advertiser(config.host, config.port, model)
    except Exception as exc:  # no multicast on this network: joining by address still works
        logger.warning("mDNS advertising failed (%s); nodes must use `parallax join -s`", exc)
        return None


def _bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (so a taken port is a plain OSError, not SystemExit)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _p2p_transport(p2p, config: SchedulerConfig) -> httpx.AsyncBaseTransport:
    """Requests to nodes that joined over P2P go through Lattica, the rest over plain HTTP."""
    from parallax.p2p.bridge import LatticaTransport
    from parallax.scheduler.forward import NODE_LIMITS

    return LatticaTransport(p2p.peer, fallback=httpx.AsyncHTTPTransport(
        limits=NODE_LIMITS, verify=config.tls.client_verify()))


async def serve(config: SchedulerConfig, state: SchedulerState | None = None) -> None:
    """Run the scheduler until cancelled or stopped by a signal."""
    p2p = None
    if config.p2p:
        from parallax.p2p.roles import start_scheduler_peer

        p2p = await asyncio.to_thread(start_scheduler_peer, config)
    try:
        state = state or SchedulerState(
            config, transport=_p2p_transport(p2p, config) if p2p is not None else None)
        await _serve(config, state, p2p)
    finally:
        if p2p is not None:
            p2p.close()


async def _serve(config: SchedulerConfig, state: SchedulerState, p2p) -> None:
    if config.model is not None and state.registry.model is None:
        await asyncio.to_thread(state.set_model, config.model, config.init_nodes_num,
                                config.quantize)
    if p2p is not None:  # before the first request can ask for it
        from parallax.scheduler.link_keys import relay_keys

        # relay only to joined peers, only what their pipeline's key sealed
        p2p.relay.forward_keys = functools.partial(relay_keys, state.link_keys, state.registry)

        state.join_command = p2p_join_command(p2p, lan_address(), config.p2p_port,
                                              config.relays)
    sock = _bind(config.host, config.port)
    server = uvicorn.Server(uvicorn.Config(
        build_app(state), host=config.host, port=config.port, log_level="warning",
        timeout_graceful_shutdown=3, lifespan="on", **config.tls.uvicorn_kwargs()))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if task.done():
        await task
        raise OSError(f"the scheduler could not start on {config.host}:{config.port}")
    where = f"{config.tls.scheme}://{config.host}:{config.port}"
    publishing = None
    if p2p is not None:
        from parallax.p2p.roles import keep_published

        where += f" and P2P peer {p2p.peer_id} (tcp port {config.p2p_port})"

        def record() -> SchedulerRecord:
            return SchedulerRecord(p2p.peer_id, peer_addresses(
                p2p.peer, lan_address(), config.p2p_port), state.model_name)

        publishing = asyncio.create_task(keep_published(p2p, record))
    model = state.model_name or "none yet (POST /scheduler/init)"
    # the one place the real token is shown unasked: this console, once (never a logger)
    print(f"Parallax scheduler listening on {where} (model: {model}); nodes join with: "
          f"{state.node_join_command(reveal=True)}", flush=True)
    advertiser = await asyncio.to_thread(_start_advertising, config, state.model_name) \
        if config.mdns else None
    try:
        await task
    finally:
        if publishing is not None:
            publishing.cancel()
        if advertiser is not None:
            await asyncio.to_thread(advertiser.close)


def run_scheduler_process(config: SchedulerConfig) -> int:
    """Entry point of `parallax run`: 0 on a clean stop, 1 on any failure (logged)."""
    try:
        asyncio.run(serve(config))
        return 0
    except KeyboardInterrupt:
        return 0
    except (ValueError, OSError) as exc:  # a bad model, a taken port: say it plainly
        logger.debug("scheduler failed", exc_info=True)
        print(f"parallax run: error: {exc}", file=sys.stderr)
        return 1
    except Exception:
        logger.exception("the scheduler failed")
        return 1
