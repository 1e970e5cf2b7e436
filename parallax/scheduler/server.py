"""`parallax run`: size the model, start the HTTP server, advertise it by mDNS, run until stopped."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import uvicorn

from parallax.config import SchedulerConfig
from parallax.scheduler.app import SchedulerState, build_app

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


async def serve(config: SchedulerConfig, state: SchedulerState | None = None) -> None:
    """Run the scheduler until cancelled or stopped by a signal."""
    state = state or SchedulerState(config)
    if config.model is not None and state.registry.model is None:
        await asyncio.to_thread(state.set_model, config.model, config.init_nodes_num)
    sock = _bind(config.host, config.port)
    server = uvicorn.Server(uvicorn.Config(
        build_app(state), host=config.host, port=config.port, log_level="warning",
        timeout_graceful_shutdown=3, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if task.done():
        await task
        raise OSError(f"the scheduler could not start on {config.host}:{config.port}")
    where = f"http://{config.host}:{config.port}"
    model = state.model_name or "none yet (POST /scheduler/init)"
    print(f"Parallax scheduler listening on {where} (model: {model}); nodes join with: "
          f"{state.join_command}", flush=True)
    advertiser = await asyncio.to_thread(_start_advertising, config, state.model_name) \
        if config.mdns else None
    try:
        await task
    finally:
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
