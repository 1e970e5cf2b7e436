"""`parallax serve`: bind the port, start the executor, serve the OpenAI API until stopped."""

from __future__ import annotations

import asyncio
import logging

from parallax.config import ServeConfig
from parallax.models.hub import check_quantize_source, resolve
from parallax.net import bind_socket, url_host
from parallax.node.executor_client import ExecutorClient
from parallax.node.http_server import NodeHttpServer, build_app
from parallax.serving.runner import install_signal_handlers, make_server, say

logger = logging.getLogger("parallax.serve")


async def serve_async(config: ServeConfig) -> int:
    """Run the node until SIGINT/SIGTERM; returns the process exit code."""
    source = resolve(config.model)  # ValueError for an unknown model, before anything starts
    check_quantize_source(source, config.quantize)  # --quantize with a GGUF: say so now
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    client = ExecutorClient(config.executor, max_restarts=config.max_restarts, on_progress=say)
    frontend = NodeHttpServer(config, client, source.name)
    server = make_server(build_app(frontend), config.tls, lifespan="off")
    install_signal_handlers(server, on_stop=client.begin_shutdown)
    await frontend.start(tokenizer_path=source.path if source.kind == "gguf" else None)
    serve_task = asyncio.create_task(server.serve(sockets=[sock]))
    ready_task = asyncio.create_task(frontend.wait_ready())
    code = 0
    try:
        await asyncio.wait({serve_task, ready_task}, return_when=asyncio.FIRST_COMPLETED)
        if ready_task.done():
            try:
                ready_task.result()
                say(f"Parallax node serving {source.name} on "
                    f"{config.tls.scheme}://{url_host(config.host)}:"
                    f"{port} (OpenAI API at /v1)")
            except Exception as exc:  # NotReadyError, or the tokenizer failed to load
                say(f"error: the model could not be started: {exc}")
                server.should_exit = True
                code = 1
        else:
            ready_task.cancel()
        await serve_task
    finally:
        ready_task.cancel()
        await frontend.close()
        sock.close()
    return code


def run_serve(config: ServeConfig) -> int:
    """Blocking entry used by the CLI."""
    return asyncio.run(serve_async(config))
