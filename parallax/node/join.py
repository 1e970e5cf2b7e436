"""`parallax join`: a node that serves whatever layers the scheduler assigns to it."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn

from parallax import protocol as P
from parallax.config import JoinConfig
from parallax.node.agent import JoinRejected, NodeAgent
from parallax.node.executor_client import ExecutorClient
from parallax.node.frontend import NodeFrontend, build_app
from parallax.serving.proxy import _Server, bind_socket, install_signal_handlers, say


def lan_address() -> str:
    """This machine's address on its default route (no packet is sent)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: routing lookup only
        return s.getsockname()[0]
    return "127.0.0.1"


def advertised_host(config: JoinConfig) -> str:
    if config.advertise_host:
        return config.advertise_host
    return lan_address() if config.host in ("0.0.0.0", "") else config.host


async def find_scheduler_address(config: JoinConfig) -> str | None:
    if config.scheduler:
        return config.scheduler
    from parallax.scheduler.discovery import find_scheduler

    say("looking for a scheduler on the local network (mDNS)")
    return await asyncio.to_thread(find_scheduler, config.discovery_timeout_s)


async def join_async(config: JoinConfig) -> int:
    """Run the node until SIGINT/SIGTERM (then leave the cluster); returns the exit code."""
    import torch

    from parallax.node.measure import measure_device

    scheduler = await find_scheduler_address(config)
    if scheduler is None:
        say("error: no scheduler found on the local network; pass -s HOST:PORT")
        return 1
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    activation_port = config.activation_port or port + 100
    host = advertised_host(config)
    say("measuring this machine")
    measured = await asyncio.to_thread(measure_device, config.device,
                                       getattr(torch, config.compute_dtype), config.memory_bytes)
    say(f"{measured.device_name}: {measured.gflops:.0f} GFLOP/s, {measured.bandwidth_gbps:.0f} "
        f"GB/s, {measured.memory_bytes / 2**30:.1f} GiB for the model")
    node_id = f"{socket.gethostname()}-{port}"
    join = P.NodeJoin(node_id, measured.device, measured.device_name, measured.memory_bytes,
                      measured.gflops, measured.bandwidth_gbps, f"http://{host}:{port}",
                      f"tcp://{host}:{activation_port}", config.max_batch_size)
    client = ExecutorClient(None, max_restarts=config.max_restarts, on_progress=say)
    frontend = NodeFrontend(config, client, "(no model yet)")
    frontend.node_id = node_id
    agent = NodeAgent(config, client, frontend, join, f"http://{scheduler}",
                      f"tcp://{config.host}:{activation_port}", say)
    server = _Server(uvicorn.Config(build_app(frontend), log_level="warning",
                                    timeout_graceful_shutdown=3, lifespan="off"))
    install_signal_handlers(server)
    await frontend.start(None)
    serve_task = asyncio.create_task(server.serve(sockets=[sock]))
    agent_task = asyncio.create_task(agent.run())
    say(f"Parallax node {node_id} on http://{host}:{port}, activations on "
        f"tcp://{host}:{activation_port}, scheduler {scheduler}")
    code = 0
    try:
        await asyncio.wait({serve_task, agent_task}, return_when=asyncio.FIRST_COMPLETED)
        if agent_task.done() and isinstance(agent_task.exception(), JoinRejected):
            say(f"error: {agent_task.exception()}")
            server.should_exit = True
            code = 1
        await serve_task
    finally:
        agent_task.cancel()
        await agent.leave()
        await frontend.close()
        sock.close()
    return code


def run_join(config: JoinConfig) -> int:
    return asyncio.run(join_async(config))
