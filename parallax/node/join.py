"""`parallax join`: a node that serves whatever layers the scheduler assigns to it."""

from __future__ import annotations

import asyncio
import socket

from parallax.config import JoinConfig
from parallax.net import bind_socket, lan_address
from parallax.node.agent import JoinRejected, NodeAgent
from parallax.node.executor_client import ExecutorClient
from parallax.node.http_server import NodeHttpServer, build_app
from parallax.p2p.peer import is_p2p_target
from parallax.protocol.control import NodeJoin
from parallax.serving.runner import install_signal_handlers, make_server, say
from parallax.serving.tls import with_scheme


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
    # a node with any TLS option speaks only https to the scheduler
    p2p, transport, scheduler_url = None, None, with_scheme(scheduler, config.tls.enabled)
    if is_p2p_target(scheduler):
        from parallax.p2p.relay import RelayedLinks
        from parallax.p2p.roles import start_node_peer

        p2p, transport = await asyncio.to_thread(start_node_peer, config, scheduler, port, host,
                                                activation_port, say)
        scheduler_url = "http://scheduler.p2p"  # the transport sends it to the scheduler's peer
    join = NodeJoin(node_id, measured.device, measured.device_name, measured.memory_bytes,
                    measured.gflops, measured.bandwidth_gbps,
                    f"{config.tls.scheme}://{host}:{port}",
                    f"tcp://{host}:{activation_port}", config.max_batch_size,
                    peer_id=p2p.peer_id if p2p else None)
    client = ExecutorClient(None, max_restarts=config.max_restarts, on_progress=say)
    frontend = NodeHttpServer(config, client, "(no model yet)")
    frontend.node_id = node_id
    frontend.join_token = config.join_token
    agent = NodeAgent(config, client, frontend, join, scheduler_url,
                      f"tcp://{config.host}:{activation_port}", say, transport=transport,
                      links=RelayedLinks(p2p.relay, say) if p2p else None,
                      scheduler_label=transport.default_peer_id if p2p else None)
    server = make_server(build_app(frontend), config.tls, lifespan="off")
    install_signal_handlers(server, on_stop=client.begin_shutdown)
    await frontend.start(None)
    serve_task = asyncio.create_task(server.serve(sockets=[sock]))
    agent_task = asyncio.create_task(agent.run())
    encrypted = " (CURVE-encrypted)" if config.tls.serves_tls else ""
    say(f"Parallax node {node_id} on {config.tls.scheme}://{host}:{port}, activations on "
        f"tcp://{host}:{activation_port}{encrypted}, scheduler {scheduler_url}")
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
        if p2p is not None:
            p2p.close()
    return code


def run_join(config: JoinConfig) -> int:
    return asyncio.run(join_async(config))
