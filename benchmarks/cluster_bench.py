"""Cluster throughput on loopback: 1 vs 2 vs 3 nodes on the built-in model, same machine.

    .venv/bin/python benchmarks/cluster_bench.py [--new-tokens 64] [--concurrency 16]

For each size it starts `parallax run` and N `parallax join` nodes with memory limits that
force an N-way split, then measures batch-1 decode tok/s and aggregate tok/s at 16 concurrent
streams through the scheduler, and prints a markdown table with ratios to one node. It also
measures the ZeroMQ hop alone (PipelineLinks round trip of one decode step's activations).
All nodes share this machine's cores (each gets cores / N threads), so the multi-node rows show
the cost of the hops and of sharing, not the speed-up separate machines would give.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import torch
import zmq

from parallax import protocol as P
from parallax.node.peers import PipelineLinks

MEMORY_FOR_SPLIT = {1: "2GB", 2: "600MB", 3: "400MB"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In each child: SIGTERM when this benchmark dies, so no node outlives it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def start_cluster(num_nodes: int, logdir: str) -> tuple[str, list[subprocess.Popen]]:
    port = free_port()
    cli = [sys.executable, "-m", "parallax.cli"]
    log = open(os.path.join(logdir, f"cluster-{num_nodes}.log"), "ab")
    procs = [subprocess.Popen([*cli, "run", "-m", "SmolLM2-135M-Instruct", "-n", str(num_nodes),
                               "--port", str(port), "--no-mdns"], stdout=log, stderr=log,
                              preexec_fn=_die_with_parent)]
    for _ in range(num_nodes):
        procs.append(subprocess.Popen(
            [*cli, "join", "-s", f"127.0.0.1:{port}", "--port", str(free_port()),
             "--activation-port", str(free_port()), "--memory", MEMORY_FOR_SPLIT[num_nodes],
             # nodes sharing this machine share its cores, as separate machines would not
             "--threads", str(max(1, (os.cpu_count() or 1) // num_nodes))],
            stdout=log, stderr=log, preexec_fn=_die_with_parent))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{url}/cluster/status_json", timeout=5).json()["data"]
            if status["status"] == "available":
                return url, procs
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    stop(procs)
    raise TimeoutError(f"{num_nodes}-node cluster did not become available")


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, new_tokens: int):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    first = None
    start = time.perf_counter()
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                tokens_now = int(line.split('"completion_tokens":')[1].split(",")[0])
                if tokens_now and first is None:
                    first = time.perf_counter() - start
                tokens = tokens_now
    return first or 0.0, time.perf_counter() - start, tokens


async def measure(url: str, new_tokens: int, concurrency: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, "Hello", 4)  # warm-up
        first, total, tokens = await one_stream(client, url, "Tell me a story.", new_tokens)
        decode = (tokens - 1) / max(total - first, 1e-9)
        start = time.perf_counter()
        results = await asyncio.gather(*[
            one_stream(client, url, f"Tell me story number {i}.", new_tokens)
            for i in range(concurrency)])
        aggregate = sum(r[2] for r in results) / (time.perf_counter() - start)
    return {"batch-1 decode tok/s": decode, f"{concurrency} streams tok/s": aggregate}


def hop_latency_ms(hidden_size: int = 576, rounds: int = 200) -> float:
    """Round trip of one decode step's activations between two PipelineLinks on loopback."""
    context = zmq.Context()
    a_endpoint, b_endpoint = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    a = PipelineLinks(context, a_endpoint, a_endpoint)
    b = PipelineLinks(context, b_endpoint, b_endpoint)
    hidden = torch.randn(1, hidden_size)
    entry = [P.ActivationEntry("r", [1], 5)]
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        a.send_activations(b_endpoint, entry, hidden)
        while (got := b.receive()) is None:
            pass
        b.send_activations(a_endpoint, entry, got[1])
        while a.receive() is None:
            pass
        samples.append((time.perf_counter() - start) * 1000 / 2)
    a.close()
    b.close()
    context.term()
    samples.sort()
    return samples[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 2, 3])
    args = parser.parse_args()
    rows = {}
    logdir = tempfile.mkdtemp(prefix="parallax-bench-")
    for size in args.sizes:
        url, procs = start_cluster(size, logdir)
        try:
            rows[size] = asyncio.run(measure(url, args.new_tokens, args.concurrency))
        finally:
            stop(procs)
        print(size, rows[size], flush=True)
    hop = hop_latency_ms()
    metrics = list(next(iter(rows.values())))
    base = rows[min(rows)]
    print(f"\nSmolLM2-135M-Instruct via the scheduler, loopback, {args.new_tokens} new tokens; "
          f"ZeroMQ hop (one decode step's activations): {hop:.3f} ms median; logs in {logdir}\n")
    print("| nodes | " + " | ".join(metrics) + " | " + " | ".join(
        f"{m} vs 1 node" for m in metrics) + " |")
    print("|---" * (1 + 2 * len(metrics)) + "|")
    for size, row in rows.items():
        print(f"| {size} | " + " | ".join(f"{row[m]:.1f}" for m in metrics) + " | "
              + " | ".join(f"{row[m] / base[m]:.2f}x" for m in metrics) + " |")


if __name__ == "__main__":
    main()
