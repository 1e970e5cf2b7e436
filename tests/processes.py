"""Helpers for tests that start servers: free loopback ports, children that die with pytest."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_pytest() -> None:
    """preexec_fn for server children: SIGTERM when pytest dies, so none outlives a killed run."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


SERVE_START_TIMEOUT_S = 120


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path,
                 timeout: float = SERVE_START_TIMEOUT_S) -> None:
    """Until `url`/health answers 200; raise with the log's tail if the process dies first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}:\n"
                               f"{open(log_path).read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout} s:\n{open(log_path).read()[-3000:]}")


@contextlib.contextmanager
def serving_tiny_models(model_dirs: dict[str, str | Path], log_dir: Path) -> Iterator[dict]:
    """One `parallax serve` per model directory, started together (small KV, one thread);
    yields {name: openai client}; kills them all afterwards."""
    import openai

    procs, clients, logs = [], {}, []
    # TMPDIR: the ipc sockets' private dir lands under pytest's tmp dir, even after a SIGKILL
    env = {**os.environ, "TMPDIR": str(log_dir)}
    try:
        for name, path in model_dirs.items():
            port = free_port()
            log_path = log_dir / f"{name}.log"
            logs.append(open(log_path, "wb"))
            cmd = [sys.executable, "-m", "parallax.cli", "serve", "-m", str(path), "--port",
                   str(port), "--dtype", "float32", "--kv-memory", "4MB", "--threads", "1",
                   "--max-batch-size", "4"]
            proc = subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=die_with_pytest)
            procs.append((proc, f"http://127.0.0.1:{port}", log_path))
            clients[name] = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                          api_key="unused", timeout=30, max_retries=0)
        for proc, url, log_path in procs:
            wait_healthy(url, proc, log_path)
        yield clients
    finally:
        for proc, _, _ in procs:
            proc.kill()
        for proc, _, _ in procs:
            proc.wait(10)
        for log in logs:
            log.close()
