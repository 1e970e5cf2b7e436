"""Cluster throughput on loopback: 1 vs 2 vs 3 nodes on the built-in model, same machine.

    .venv/bin/python benchmarks/cluster_bench.py [--new-tokens 64] [--concurrency 16]
    .venv/bin/python benchmarks/cluster_bench.py --p2p [--reps 2] [--new-tokens 64]
    .venv/bin/python benchmarks/cluster_bench.py --chat-turns 8 [--new-tokens 32]

For each size it starts `parallax run` and N `parallax join` nodes with memory limits that
force an N-way split, then measures batch-1 decode tok/s and aggregate tok/s at 16 concurrent
streams through the scheduler, and prints a markdown table with ratios to one node. It also
measures the ZeroMQ hop alone (PipelineLinks round trip of one decode step's activations).
All nodes share this machine's cores (each gets cores / N threads), so the multi-node rows show
the cost of the hops and of sharing, not the speed-up separate machines would give.

With --p2p it instead compares a 2-node cluster whose nodes join the scheduler directly (HTTP)
with one whose nodes join over Lattica (`parallax run --p2p`, `parallax join -s /ip4/.../p2p/ID`:
join, heartbeats and the scheduler's chat forwarding to the head node travel as Lattica
streams; activations go over ZeroMQ unless a node finds its peer's endpoint unreachable, which
the table counts). Each repetition starts a fresh cluster of each kind, one after the other
(direct first, then p2p first, ...), timing each join: node processes started -> the scheduler
lists every node -> cluster "available", plus each node's own join round trip and P2P peer
start-up, from its log lines. With both clusters up, it alternates batch-1 streams between
them (ABBA) for decode tok/s, ms per token (mean, and median inter-token gap) and time to first
token, then runs 16 concurrent streams on each for aggregate tok/s. It prints a markdown table
of medians over repetitions with p2p - direct and p2p / direct (the per-token overhead of P2P).
Lattica probes public STUN servers whenever a peer starts, so --p2p runs inside a network
namespace with only loopback: outside one, the script re-executes itself under
`unshare --net --mount` (needs root or user namespaces; PARALLAX_NETNS=1 marks the inside),
and both kinds of cluster run there.

With --chat-turns N it measures a chat through a 2-node pipeline: one conversation of N turns,
each sending the whole history plus a new user message of about 100 tokens (greedy answers of
--new-tokens tokens), once on a cluster with prefix caching (the default) and once on one whose
nodes run with --no-prefix-caching. It prints time to first token per turn for both (and the
prefix tokens each stage skipped, from the nodes' /health), and turn N's TTFT / turn 1's.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import torch
import zmq

from parallax.node.link_auth import LinkSecurity
from parallax.node.links import LinkLimits, PipelineLinks
from parallax.protocol.links import ActivationEntry

SHARE_FOR_SPLIT = {1: 2.0, 2: 0.6, 3: 0.4}  # of the whole model's budget: 1, 2 or 3 stages


def memory_for_split(num_nodes: int) -> str:
    """A node `--memory` that makes the scheduler split the built-in model `num_nodes` ways
    (from its own sizing, which counts packed GGUF bytes)."""
    from parallax.models.hub import DEFAULT_MODEL
    from parallax.scheduler.catalog import ModelCatalog, solo_memory_bytes

    spec = ModelCatalog("float32").spec(DEFAULT_MODEL)
    return f"{int(SHARE_FOR_SPLIT[num_nodes] * solo_memory_bytes(spec) / 2**20)}MB"
NETNS_MARKER = "PARALLAX_NETNS"  # "1" inside the loopback-only namespace (as tests/p2p use it)
# node log lines (parallax/node/join.py, agent.py) whose arrival times split a node's start-up
NODE_MARKS = {"measured": "GFLOP/s", "p2p_peer": "P2P peer 12D3KooW",
              "agent": "Parallax node ", "joined": "joined ", "waiting": "waiting for the scheduler"}
# node log lines counted: rejoins after an eviction, activation links moved off ZeroMQ tcp
NODE_COUNTS = {"rejoins after eviction": "the scheduler forgot this node",
               "activation links via Lattica": "is not reachable over tcp"}
COUNTERS = ("join retries", *NODE_COUNTS, "short (failed) streams")  # summed, not medians


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In each child: SIGTERM when this benchmark dies, so no node outlives it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class Cluster:
    """`parallax run` + N `parallax join` on loopback; nodes join directly or over Lattica."""

    def __init__(self, num_nodes: int, logdir: str, p2p: bool = False, name: str = "",
                 node_args: tuple[str, ...] = ()) -> None:
        self.num_nodes, self.p2p = num_nodes, p2p
        self.node_args = node_args  # more `parallax join` options for every node
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(logdir, f"cluster-{name or num_nodes}.log")
        self.log = open(self.log_path, "ab")
        self.log_lock = threading.Lock()
        self.env = {**os.environ, "PARALLAX_P2P_HOME": os.path.join(logdir, f"keys-{name}")}
        self.procs: list[subprocess.Popen] = []
        self.node_ports: list[int] = []
        self.marks: dict[int, dict[str, float]] = {}  # node port -> mark -> monotonic time
        self.counts = dict.fromkeys(NODE_COUNTS, 0)
        self.followers: list[threading.Thread] = []

    def _spawn(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "parallax.cli", *args], env=self.env,
                                preexec_fn=_die_with_parent, **kwargs)
        self.procs.append(proc)
        return proc

    def _follow(self, port: int, proc: subprocess.Popen) -> None:
        """Copy a node's output to the log, noting when its marker lines arrive."""
        marks = self.marks.setdefault(port, {})
        for line in proc.stdout:
            now = time.monotonic()
            text = line.decode(errors="replace")
            for mark, needle in NODE_MARKS.items():
                if needle in text and mark not in marks:
                    marks[mark] = now
            for name, needle in NODE_COUNTS.items():
                self.counts[name] += needle in text
            with self.log_lock:
                if self.log.closed:
                    continue
                self.log.write(f"[node-{port} {now - self.nodes_started_at:8.3f}s] ".encode()
                               + line)
                self.log.flush()

    def status(self) -> dict:
        return httpx.get(f"{self.url}/cluster/status_json", timeout=5).json()["data"]

    def start(self, timeout: float = 300) -> dict[str, float]:
        """Start everything; return join timings (seconds) once the cluster is available."""
        args = ["run", "-m", "SmolLM2-135M-Instruct", "-n", str(self.num_nodes),
                "--port", str(self.port), "--no-mdns"]
        if self.p2p:
            args += ["--p2p", "--p2p-port", str(p2p_port := free_port())]
        self._spawn(args, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + timeout
        target = f"127.0.0.1:{self.port}"
        while True:  # the scheduler first, so node start -> join times exclude its start-up
            try:
                command = httpx.get(f"{self.url}/node/join/command", timeout=5).json()
                command = command["data"]["command"]
                if not self.p2p:
                    break
                if found := re.search(r"/p2p/(12D3KooW\w+)", command):
                    target = f"/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{found.group(1)}"
                    break
            except (httpx.HTTPError, KeyError, ValueError, TypeError):
                pass
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise RuntimeError(f"the scheduler did not come up; see {self.log_path}")
            time.sleep(0.05)
        self.nodes_started_at = start = time.monotonic()
        for _ in range(self.num_nodes):
            port = free_port()
            args = ["join", "-s", target, "--port", str(port),
                    "--activation-port", str(free_port()),
                    "--memory", memory_for_split(self.num_nodes),
                    # nodes sharing this machine share its cores, as separate machines would not
                    "--threads", str(max(1, (os.cpu_count() or 1) // self.num_nodes))]
            if self.p2p:
                args += ["--p2p-port", str(free_port())]
            args += list(self.node_args)
            proc = self._spawn(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self.node_ports.append(port)
            self.followers.append(threading.Thread(target=self._follow, args=(port, proc),
                                                   daemon=True))
            self.followers[-1].start()
        listed: dict[int, float] = {}
        while time.monotonic() < deadline:
            try:
                status = self.status()
            except (httpx.HTTPError, KeyError, ValueError):
                time.sleep(0.02)
                continue
            now = time.monotonic()
            for node in status.get("node_list", []):
                for port in self.node_ports:
                    if str(node.get("node_id", "")).endswith(f"-{port}"):
                        listed.setdefault(port, now)
            if status["status"] == "available":
                return self._join_timings(start, listed, now)
            time.sleep(0.02 if len(listed) < self.num_nodes else 0.1)
        raise TimeoutError(f"{self.num_nodes}-node cluster did not become available; "
                           f"see {self.log_path}")

    def _join_timings(self, start: float, listed: dict[int, float], available: float):
        time.sleep(0.2)  # let the log followers catch up with lines already written
        rtt = [m["joined"] - m["agent"] for m in self.marks.values()
               if "joined" in m and "agent" in m]
        peer = [m["p2p_peer"] - m["measured"] for m in self.marks.values()
                if "p2p_peer" in m and "measured" in m]
        measured = [m["measured"] - start for m in self.marks.values() if "measured" in m]
        return {
            "start -> all listed s": max(listed.values()) - start if listed else float("nan"),
            "start -> available s": available - start,
            "start -> measured s": max(measured) if measured else float("nan"),
            "P2P peer start ms": 1000 * statistics.mean(peer) if peer else 0.0,
            "join round trip ms": 1000 * statistics.mean(rtt) if rtt else float("nan"),
            "join retries": sum("waiting" in m for m in self.marks.values()),
        }

    def counters(self) -> dict[str, int]:
        """NODE_COUNTS over the cluster's whole life (call after the measurements)."""
        return dict(self.counts)

    def stop(self) -> None:
        stop(self.procs[1:])  # nodes first, so their leave still reaches the scheduler
        stop(self.procs[:1])
        for follower in self.followers:  # they end at EOF, once the nodes have exited
            follower.join(5)
        with self.log_lock:
            self.log.close()


def start_cluster(num_nodes: int, logdir: str) -> tuple[str, list[subprocess.Popen]]:
    cluster = Cluster(num_nodes, logdir)
    try:
        cluster.start()
    except BaseException:
        stop(cluster.procs)
        raise
    return cluster.url, cluster.procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, new_tokens: int,
                     arrivals: list[tuple[float, int]] | None = None):
    """(time to first token, total time, tokens) of one streamed completion; `arrivals` gets
    (seconds since the request, completion tokens so far) of each chunk that added tokens."""
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
                if arrivals is not None and tokens_now > tokens:
                    arrivals.append((time.perf_counter() - start, tokens_now))
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


def tree_cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds so far of these processes and all their descendants."""
    stats, children = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0.0, list(pids)
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


async def measure_interleaved(clusters: dict[str, Cluster], order: list[str], new_tokens: int,
                              concurrency: int, batch1_runs: int) -> dict[str, dict]:
    """Batch-1 streams alternating between the clusters (ABBA...), then one `concurrency`-stream
    run on each; both clusters stay up, so each batch-1 pair shares the same moment of this
    machine. Streams that end with fewer tokens than asked (failed requests) are counted and
    left out of the batch-1 figures. Also notes the CPU each cluster burns while idle."""
    samples = {m: {"decode": [], "first": [], "gaps": [], "short": 0, "idle_cpu": []}
               for m in clusters}
    pids = {m: [p.pid for p in c.procs] for m, c in clusters.items()}

    async def timed(mode, coro):
        """Await `mode`'s measurement, noting the CPU share each other (idle) cluster used."""
        others = [m for m in clusters if m != mode]
        cpu0 = {m: tree_cpu_seconds(pids[m]) for m in others}
        t0 = time.perf_counter()
        result = await coro
        elapsed = time.perf_counter() - t0
        for m in others:
            samples[m]["idle_cpu"].append((tree_cpu_seconds(pids[m]) - cpu0[m]) / elapsed)
        return result

    async with httpx.AsyncClient(timeout=600) as client:
        for mode in order:
            await one_stream(client, clusters[mode].url, "Hello", 4)  # warm-up
        for i in range(batch1_runs):
            for mode in (order if i % 2 == 0 else order[::-1]):
                arrivals: list[tuple[float, int]] = []
                first, total, tokens = await timed(mode, one_stream(
                    client, clusters[mode].url, f"Tell me story {i}.", new_tokens, arrivals))
                got = samples[mode]
                if tokens < new_tokens:
                    got["short"] += 1
                    continue
                got["decode"].append((tokens - 1) / max(total - first, 1e-9))
                got["first"].append(first)
                for (t0, n0), (t1, n1) in itertools.pairwise(arrivals):
                    got["gaps"] += [(t1 - t0) / (n1 - n0)] * (n1 - n0)
        aggregate = {}
        for mode in order[::-1]:  # the batch-1 loop ended on order[0] (even runs) or order[-1]
            start = time.perf_counter()
            results = await timed(mode, asyncio.gather(*[
                one_stream(client, clusters[mode].url, f"Tell me story number {i}.", new_tokens)
                for i in range(concurrency)]))
            aggregate[mode] = sum(r[2] for r in results) / (time.perf_counter() - start)
            samples[mode]["short"] += sum(r[2] < new_tokens for r in results)
    nan = float("nan")
    rows = {}
    for mode, got in samples.items():
        decode = statistics.median(got["decode"]) if got["decode"] else nan
        rows[mode] = {
            "batch-1 decode tok/s": decode, "batch-1 ms/token": 1000 / decode,
            "batch-1 ITL median ms": 1000 * statistics.median(got["gaps"]) if got["gaps"] else nan,
            "batch-1 TTFT ms": 1000 * statistics.median(got["first"]) if got["first"] else nan,
            f"{concurrency} streams tok/s": aggregate[mode],
            "short (failed) streams": got["short"],
            "CPU % while idle (other measured)": 100 * statistics.median(got["idle_cpu"]),
        }
    return rows


def hop_latency_ms(hidden_size: int = 576, rounds: int = 200) -> float:
    """Round trip of one decode step's activations between two PipelineLinks on loopback."""
    context = zmq.Context()
    a_endpoint, b_endpoint = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    limits = LinkLimits(hidden_size, 4096, 8192, 2**20)
    key, endpoints = os.urandom(32), [a_endpoint, b_endpoint]
    a, b = (PipelineLinks(context, e, e, limits, LinkSecurity(key, endpoints)) for e in endpoints)
    hidden = torch.randn(1, hidden_size)
    entry = [ActivationEntry("r", [1], 5, head_endpoint=a_endpoint)]
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        a.send_activations(b_endpoint, entry, hidden)
        while (got := b.receive()) is None:
            a.flush()  # the first message waits for the connection
        b.send_activations(a_endpoint, entry, got[1])
        while a.receive() is None:
            b.flush()
        samples.append((time.perf_counter() - start) * 1000 / 2)
    a.close()
    b.close()
    context.term()
    samples.sort()
    return samples[len(samples) // 2]


def reexec_in_namespace() -> None:
    """Run this script again inside a fresh network namespace with only loopback up."""
    if os.environ.get(NETNS_MARKER) == "1":
        return
    problem = None
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        problem = "`unshare` (util-linux) or `ip` (iproute2) is not installed"
    else:
        probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True,
                               text=True)
        if probe.returncode != 0:
            problem = f"`unshare --net --mount` failed: {probe.stderr.strip()}"
    if problem:
        sys.exit(f"error: --p2p needs a network namespace with only loopback (Lattica probes "
                 f"public STUN servers at every start), but {problem}. Run as root, or start "
                 f"it yourself inside one with {NETNS_MARKER}=1 set.")
    print("re-running inside `unshare --net --mount` (loopback only)", file=sys.stderr,
          flush=True)
    script = os.path.abspath(sys.argv[0])
    os.execvpe("unshare", ["unshare", "--net", "--mount", "sh", "-c",
                           'ip link set lo up && exec "$0" "$@"',
                           sys.executable, script, *sys.argv[1:]],
               {**os.environ, NETNS_MARKER: "1"})


def log_problems(logdir: str) -> list[str]:
    """Lines in the cluster logs that look like errors (with their count per log)."""
    pattern = re.compile(r"Traceback|\bERROR\b|\berror\b|\bException\b|WARNING|failed",
                         re.IGNORECASE)
    found = []
    for name in sorted(os.listdir(logdir)):
        if not name.endswith(".log"):
            continue
        with open(os.path.join(logdir, name), errors="replace") as f:
            hits = [line.rstrip() for line in f if pattern.search(line)]
        if hits:
            found.append(f"{name}: {len(hits)} suspicious lines, e.g. {hits[0][:200]}")
    return found


def run_p2p_comparison(args: argparse.Namespace) -> None:
    reexec_in_namespace()
    logdir = tempfile.mkdtemp(prefix="parallax-bench-p2p-")
    modes = ("direct", "p2p")
    joins: dict[str, list[dict]] = {m: [] for m in modes}
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(args.reps):
        # ABBA: direct first, then p2p first, ... so drift on this shared machine and being
        # started second (beside an idle cluster) hit both modes alike
        order = list(modes if rep % 2 == 0 else modes[::-1])
        clusters: dict[str, Cluster] = {}
        try:
            for mode in order:
                clusters[mode] = Cluster(2, logdir, p2p=mode == "p2p", name=f"{mode}-{rep}")
                joins[mode].append(clusters[mode].start())
                print(f"rep {rep} {mode} joined: " + ", ".join(
                    f"{k} {v:.3g}" for k, v in joins[mode][-1].items()), flush=True)
            measured = asyncio.run(measure_interleaved(clusters, order, args.new_tokens,
                                                       args.concurrency, args.batch1_runs))
        except (TimeoutError, RuntimeError) as exc:
            print(f"rep {rep}: skipped: {exc}", flush=True)
            continue
        finally:
            for cluster in clusters.values():
                cluster.stop()
        for mode in modes:
            rows[mode].append({**measured[mode], **clusters[mode].counters()})
            print(f"rep {rep} {mode}: " + ", ".join(
                f"{k} {v:.3g}" for k, v in rows[mode][-1].items()), flush=True)
    if not (rows["direct"] and rows["p2p"]):
        sys.exit(f"error: no complete repetition of some mode; logs in {logdir}")
    hop = hop_latency_ms()

    def med(samples: list[dict], key: str) -> float:
        """Median over repetitions (NaN where none had a value); counters are summed."""
        values = [s[key] for s in samples if s[key] == s[key]]
        if key in COUNTERS:
            return sum(values)
        return statistics.median(values) if values else float("nan")

    print(f"\nSmolLM2-135M-Instruct, 2 nodes x {memory_for_split(2)} via the scheduler, loopback in a network "
          f"namespace, {args.new_tokens} new tokens, {args.batch1_runs} batch-1 streams per "
          f"cluster; medians over {len(rows['direct'])} direct and {len(rows['p2p'])} p2p fresh "
          f"clusters (alternating); ZeroMQ hop alone (one decode step's activations): "
          f"{hop:.3f} ms median; logs in {logdir}\n")
    print("| metric | direct | p2p | p2p - direct | p2p / direct |")
    print("|---|---|---|---|---|")
    for samples in (joins, rows):
        for key in samples["direct"][0]:
            d, p = med(samples["direct"], key), med(samples["p2p"], key)
            ratio = f"{p / d:.2f}x" if d and key not in COUNTERS else "—"
            print(f"| {key} | {d:.3g} | {p:.3g} | {p - d:+.3g} | {ratio} |")
    for key in ("batch-1 ms/token", "batch-1 ITL median ms"):
        d, p = med(rows["direct"], key), med(rows["p2p"], key)
        print(f"\nP2P per-token overhead ({key}): {p - d:+.3f} ms/token "
              f"({100 * (p - d) / d:+.1f}%, p2p/direct {p / d:.3f}x)")
    for problem in log_problems(logdir):
        print(f"log: {problem}")


CHAT_TOPICS = ["the history of tea", "how bridges carry loads", "why the sky is blue",
               "the water cycle", "how vaccines train the immune system",
               "the rules of chess", "how compilers work", "the life of honey bees",
               "plate tectonics", "how batteries store energy"]


def chat_message(turn: int) -> str:
    """A user message of about 100 tokens, different every turn."""
    topic = CHAT_TOPICS[turn % len(CHAT_TOPICS)]
    return (f"Turn {turn + 1}. I am preparing a short talk and I would like your help with "
            f"{topic}. Please keep in mind that the audience are curious students who know "
            f"little about {topic}, that the talk lasts five minutes, and that I want one "
            f"surprising fact, one simple comparison with everyday life, and one open question "
            f"to finish. Start with a single sentence that introduces {topic} plainly.")


async def chat_turns(url: str, node_ports: list[int], turns: int,
                     new_tokens: int) -> list[dict[str, float]]:
    """One conversation of `turns` turns; per turn: prompt tokens, TTFT (ms) and the prefix
    tokens each stage skipped (its /health counter's growth)."""
    rows = []
    messages: list[dict[str, str]] = []
    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, "Hello", 2)  # warm-up (a different prefix)
        for turn in range(turns):
            messages.append({"role": "user", "content": chat_message(turn)})
            before = [httpx.get(f"http://127.0.0.1:{p}/health", timeout=5).json()
                      for p in node_ports]
            body = {"messages": messages, "max_tokens": new_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            first, text, usage, metrics = None, [], {}, {}
            start = time.perf_counter()
            async with client.stream("POST", f"{url}/v1/chat/completions",
                                     json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    metrics = chunk.get("metrics") or metrics
                    for choice in chunk.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            first = first or time.perf_counter() - start
                            text.append(piece)
            after = [httpx.get(f"http://127.0.0.1:{p}/health", timeout=5).json()
                     for p in node_ports]
            messages.append({"role": "assistant", "content": "".join(text)})
            stages = metrics.get("stages") or []
            rows.append({"prompt tokens": usage.get("prompt_tokens", 0),
                         "ttft ms": 1000 * (first or float("nan")),
                         # where the time went: the head's own TTFT (from its HTTP server's
                         # request to the first token) and each stage's whole-request figures
                         "head ttft ms": metrics.get("ttft_ms") or float("nan"),
                         "compute ms": [s.get("compute_ms") for s in stages],
                         "queue ms": [s.get("queue_ms") for s in stages],
                         "hops ms": metrics.get("hops_ms") or [],
                         "hits": [a.get("num_prefix_hit_tokens", 0)
                                  - b.get("num_prefix_hit_tokens", 0)
                                  for a, b in zip(after, before, strict=True)]})
            print(turn + 1, rows[-1], flush=True)
    return rows


def run_chat_turns(args: argparse.Namespace) -> None:
    logdir = tempfile.mkdtemp(prefix="parallax-bench-")
    results = {}
    for mode, node_args in (("caching", ()), ("no caching", ("--no-prefix-caching",))):
        cluster = Cluster(2, logdir, name=mode.replace(" ", "-"), node_args=node_args)
        try:
            cluster.start()
            results[mode] = asyncio.run(chat_turns(cluster.url, cluster.node_ports,
                                                   args.chat_turns, args.new_tokens))
        finally:
            cluster.stop()
    on, off = results["caching"], results["no caching"]
    print(f"\nSmolLM2-135M-Instruct, 2-node pipeline on loopback, one chat of "
          f"{args.chat_turns} turns ({args.new_tokens} new tokens each); logs in {logdir}\n")
    print("| turn | prompt tokens | TTFT caching ms | prefix hit per stage | "
          "TTFT no caching ms |")
    print("|---|---|---|---|---|")
    for turn, (a, b) in enumerate(zip(on, off, strict=True), 1):
        hits = " / ".join(str(h) for h in a["hits"])
        print(f"| {turn} | {a['prompt tokens']} | {a['ttft ms']:.0f} | {hits} | "
              f"{b['ttft ms']:.0f} |")
    print("\nWhere the time went with caching (whole request: prefill and all decode steps):\n")
    print("| turn | TTFT at the client ms | TTFT at the head ms | compute per stage ms | "
          "queue per stage ms | hops ms |")
    print("|---|---|---|---|---|---|")
    for turn, a in enumerate(on, 1):
        print(f"| {turn} | {a['ttft ms']:.0f} | {a['head ttft ms']:.0f} | "
              f"{' / '.join(f'{x:.0f}' for x in a['compute ms'])} | "
              f"{' / '.join(f'{x:.0f}' for x in a['queue ms'])} | "
              f"{' / '.join(f'{x:.0f}' for x in a['hops ms'])} |")
    print(f"\nturn {len(on)} / turn 1 TTFT: caching {on[-1]['ttft ms'] / on[0]['ttft ms']:.2f}x, "
          f"no caching {off[-1]['ttft ms'] / off[0]['ttft ms']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--p2p", action="store_true",
                        help="compare a 2-node cluster joined directly with one joined over "
                             "Lattica instead of the size sweep")
    parser.add_argument("--reps", type=int, default=2,
                        help="--p2p: repetitions, each with a fresh cluster per mode (default 2)")
    parser.add_argument("--batch1-runs", type=int, default=4,
                        help="--p2p: batch-1 streams per cluster and repetition (default 4)")
    parser.add_argument("--chat-turns", type=int, default=0, metavar="N",
                        help="measure TTFT per turn of an N-turn chat on a 2-node pipeline, "
                             "with and without prefix caching, instead of the size sweep")
    args = parser.parse_args()
    # SIGTERM (e.g. `timeout`) unwinds through the finally blocks that stop the clusters
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.p2p:
        run_p2p_comparison(args)
        return
    if args.chat_turns:
        if args.new_tokens == parser.get_default("new_tokens"):
            args.new_tokens = 32
        run_chat_turns(args)
        return
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
