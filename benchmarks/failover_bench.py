"""Streams through node failures on loopback: replay on failure under repeated kills.

    .venv/bin/python benchmarks/failover_bench.py [--streams 16] [--max-tokens 256]
        [--duration 120] [--kill-every 20] [--restart-after 10]

Two runs, each on a fresh cluster (`parallax run` + 3 `parallax join`: a 2-stage pipeline and
a standby, as in tests/test_failover_cluster.py): first undisturbed, then with one node of the
serving pipeline killed (kill -9, frontend and executor) every `--kill-every` s, alternating
head and tail, and restarted `--restart-after` s later (same port, so it rejoins as the same
node). In both, `--streams` clients each send greedy streaming chat requests one after the
other until `--duration` s have passed; every stream that started is read to its end.

Prints the CPU flags, then a markdown table per run: streams completed / errored, tokens/s,
failovers, and the latency each failover added to its stream (`metrics.replay_ms`: from the
failure the scheduler saw to the first new text, p50 / p95), next to what that latency is made
of: the dead node's eviction (`--heartbeat-timeout`), the standby's layer load (from the node
logs: "loaded ... in X s") and the prefill of the replayed context on the new pipeline.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
from cluster_bench import _die_with_parent, free_port, memory_for_split, stop

from parallax.models.quant import native
from parallax.serving.sse import parse_sse_lines

HEARTBEAT_TIMEOUT_S = 6
PROMPTS = ["Write a long story about a lighthouse keeper.",
           "Explain, step by step, how a compiler works.",
           "Describe every planet of the solar system in detail.",
           "List one hundred uses for a paper clip."]
LOADED = re.compile(rb"loaded \S+ in ([0-9.]+) s")


class FailoverCluster:
    """The scheduler and three nodes; nodes can be killed and restarted by port."""

    def __init__(self, logdir: str, threads: int, max_replays: int = 3) -> None:
        self.logdir, self.threads = logdir, threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.scheduler = self._spawn("scheduler", [
            "run", "-m", "SmolLM2-135M-Instruct", "-n", "2", "--port", str(self.port),
            "--no-mdns", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--max-replays", str(max_replays),
            "--replay-wait-s", "120"])
        self.nodes: dict[int, subprocess.Popen] = {}
        self.activation_ports: dict[int, int] = {}
        for _ in range(3):
            self.start_node(free_port())

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.logdir, f"{name}.log"), "ab")
        return subprocess.Popen([sys.executable, "-m", "parallax.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def start_node(self, port: int) -> None:
        activation = self.activation_ports.setdefault(port, free_port())
        self.nodes[port] = self._spawn(f"node-{port}", [
            "join", "-s", f"127.0.0.1:{self.port}", "--port", str(port), "--activation-port",
            str(activation), "--memory", memory_for_split(2), "--max-batch-size", "16",
            "--threads", str(self.threads)])

    def kill(self, port: int) -> None:
        proc = self.nodes[port]
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        proc.kill()
        for child in children:
            try:
                os.kill(int(child), signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)

    def status(self) -> dict:
        return httpx.get(f"{self.url}/cluster/status_json", timeout=5).json()["data"]

    def wait_available(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = self.status()
                if status["status"] == "available":
                    return status
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the cluster did not become available; logs in {self.logdir}")

    def load_times_s(self) -> list[float]:
        """Every layer load any node logged (first loads and repairs alike)."""
        out = []
        for name in os.listdir(self.logdir):
            if name.startswith("node-"):
                with open(os.path.join(self.logdir, name), "rb") as f:
                    out += [float(m.group(1)) for m in LOADED.finditer(f.read())]
        return out

    def close(self) -> None:
        stop(list(self.nodes.values()))
        stop([self.scheduler])


class Result:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.completed = self.errored = self.tokens = self.failovers = 0
        self.replay_ms: list[float] = []  # per failover
        self.errors: list[str] = []

    def add(self, events: list, error: str | None) -> None:
        chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
        final = chunks[-1] if chunks else {}
        finish = final.get("choices", [{}])[0].get("finish_reason") if final else None
        failed = error or finish not in ("length", "stop") or \
            any(isinstance(e, dict) and e.get("object") == "error" for e in events)
        metrics = final.get("metrics") or {}
        with self.lock:
            if failed:
                self.errored += 1
                self.errors.append(error or str([e for e in events if isinstance(e, dict)
                                                 and e.get("object") == "error"])[:200])
                return
            self.completed += 1
            self.tokens += (final.get("usage") or {}).get("completion_tokens", 0)
            count = metrics.get("failovers", 0)
            self.failovers += count
            if count:
                self.replay_ms += [metrics.get("replay_ms", 0.0) / count] * count


def client(url: str, index: int, max_tokens: int, until: float, result: Result) -> None:
    """Streams one after the other until `until`; each one is read to its end."""
    turn = 0
    while time.monotonic() < until:
        body = {"model": "default", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "messages": [{"role": "user",
                              "content": PROMPTS[(index + turn) % len(PROMPTS)]}]}
        turn += 1
        events: list = []
        error = None
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                              timeout=httpx.Timeout(30, read=300)) as response:
                events = list(parse_sse_lines(response.iter_lines()))
        except httpx.HTTPError as exc:
            error = repr(exc)
        result.add(events, error)


def killer(cluster: FailoverCluster, every: float, restart_after: float, until: float,
           log: list[str], restarts: queue.Queue) -> None:
    """Kill the serving pipeline's head, then its tail, ...; ask for each one's restart (the
    main thread starts nodes: a child's death signal fires when the thread that forked it
    ends)."""
    started = time.monotonic()
    turn = 0
    while time.monotonic() + every < until:
        time.sleep(every)
        try:
            pipeline = cluster.status()["pipelines"][0]
        except (httpx.HTTPError, KeyError, IndexError):
            log.append(f"{time.monotonic() - started:6.1f}s no pipeline to kill a node of")
            continue
        victim = pipeline[0] if turn % 2 == 0 else pipeline[-1]
        turn += 1
        port = next(p for p in cluster.nodes if victim.endswith(f"-{p}"))
        cluster.kill(port)
        log.append(f"{time.monotonic() - started:6.1f}s killed {victim}")
        restarts.put((time.monotonic() + restart_after, port))


def run(args: argparse.Namespace, with_kills: bool) -> dict:
    logdir = tempfile.mkdtemp(prefix="failover-bench-")
    cluster = FailoverCluster(logdir, max(1, (os.cpu_count() or 1) // 3), args.max_replays)
    try:
        cluster.wait_available()
        loads_before = len(cluster.load_times_s())
        result, kills, restarts = Result(), [], queue.Queue()
        started = time.monotonic()
        until = started + args.duration
        threads = [threading.Thread(target=client, args=(cluster.url, i, args.max_tokens,
                                                         until, result), daemon=True)
                   for i in range(args.streams)]
        if with_kills:
            threads.append(threading.Thread(target=killer, daemon=True, args=(
                cluster, args.kill_every, args.restart_after, until, kills, restarts)))
        for thread in threads:
            thread.start()
        due: list[tuple[float, int]] = []
        deadline = until + 600
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            while not restarts.empty():
                due.append(restarts.get())
            for item in [d for d in due if d[0] <= time.monotonic()]:
                due.remove(item)
                cluster.start_node(item[1])
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        loads = cluster.load_times_s()[loads_before:]
        return {"result": result, "elapsed": elapsed, "loads": loads, "kills": kills,
                "logdir": logdir}
    finally:
        cluster.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--restart-after", type=float, default=10.0)
    parser.add_argument("--max-replays", type=int, default=3,
                        help="the scheduler's --max-replays (a stream that meets more kills "
                             "than this fails by design)")
    args = parser.parse_args()
    print(f"CPU flags: {native.flags_summary()}; {os.cpu_count()} cores shared by 3 nodes")
    runs = {"undisturbed": run(args, False), "with kills": run(args, True)}
    base_tps = runs["undisturbed"]["result"].tokens / runs["undisturbed"]["elapsed"]
    print(f"\n{args.streams} streams of {args.max_tokens} tokens for {args.duration:g} s; "
          f"a kill every {args.kill_every:g} s, restart after {args.restart_after:g} s; "
          f"eviction after {HEARTBEAT_TIMEOUT_S} s without a heartbeat; "
          f"--max-replays {args.max_replays}\n")
    print("| run | completed | errored | tokens/s | vs undisturbed | failovers | "
          "added ms p50 | added ms p95 | layer loads s (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, data in runs.items():
        r = data["result"]
        tps = r.tokens / data["elapsed"]
        loads = data["loads"]
        print(f"| {name} | {r.completed} | {r.errored} | {tps:.1f} | {tps / base_tps:.2f}x | "
              f"{r.failovers} | {percentile(r.replay_ms, 0.5):.0f} | "
              f"{percentile(r.replay_ms, 0.95):.0f} | "
              f"{statistics.median(loads) if loads else float('nan'):.1f} ({len(loads)}) |")
    for line in runs["with kills"]["kills"]:
        print("  ", line)
    for name, data in runs.items():
        for error in data["result"].errors[:5]:
            print(f"   {name} error: {error}")
        print(f"   {name} logs: {data['logdir']}")


if __name__ == "__main__":
    main()
