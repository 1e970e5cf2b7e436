"""docs/architecture.md stays true: one real request follows its numbered path, hop by hop.

A loopback 2-node pipeline runs with `PARALLAX_TRACE_CALLS` (parallax/_calltrace.py): every
process records the first call of each project function. The test starts a fresh recording,
sends one streamed chat request through the scheduler, and checks that every hop of the
numbered list in docs/architecture.md ("N. [process] `parallax/file.py:function` ...") was
called in that process, in the list's order (the wall-clock time of each hop's first call
never goes back: these are first calls, each caused by the hop before). It prints the number
of distinct project modules the request entered (functions that an idle cluster calls on its
own in as long a time, heartbeats and polling, are left out of that count).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from test_cluster import START_TIMEOUT_S, LocalCluster, running, split_memory

from parallax.serving.sse import parse_sse_lines

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
HOP = re.compile(r"^(\d+)\. \[([a-z ]+)\] `(parallax/[\w/]+\.py):([\w.<>]+)`", re.MULTILINE)
ROLES = ("scheduler", "head http", "head executor", "last executor")
IDLE_S = 4.0  # longer than a heartbeat interval (heartbeat timeout / 3)


def doc_hops() -> list[tuple[int, str, str, str]]:
    """(number, process role, file, function) of every hop of the documented path."""
    hops = [(int(n), role, file, func) for n, role, file, func in HOP.findall(DOC.read_text())]
    assert hops, f"no numbered `[process] parallax/file.py:function` hops in {DOC}"
    assert [h[0] for h in hops] == list(range(1, len(hops) + 1)), "hops must be numbered 1..N"
    unknown = {h[1] for h in hops} - set(ROLES)
    assert not unknown, f"unknown process roles {unknown}; use one of {ROLES}"
    return hops


class TracedCluster(LocalCluster):
    def __init__(self, tmp_path, trace_dir: Path) -> None:
        self.trace_dir = trace_dir
        super().__init__(tmp_path, num_nodes=2, memory=split_memory())

    def _spawn(self, name, args):
        self.env = {**self.env, "PARALLAX_TRACE_CALLS": str(self.trace_dir)}
        return super()._spawn(name, args)


def read_traces(trace_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(trace_dir.glob("calls-*.json"))]


def new_epoch(trace_dir: Path, epoch: str, num_processes: int) -> None:
    """Every traced process starts a fresh recording (forgets what it called so far)."""
    (trace_dir / "epoch").write_text(epoch)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        traces = read_traces(trace_dir)
        if sum(t["epoch"] == epoch for t in traces) >= num_processes:
            return
        time.sleep(0.1)
    raise AssertionError(f"not every process started epoch {epoch}: {len(traces)} files")


def roles_of(traces: list[dict], cluster: TracedCluster) -> dict[str, dict]:
    """The trace of each role's process: the scheduler, the head node's HTTP server and
    executor, the last node's executor."""
    pipeline = cluster.status()["pipelines"][0]
    port_of = {node_id: int(node_id.rsplit("-", 1)[1]) for node_id in pipeline}
    pids = {"scheduler": cluster.scheduler.pid,
            "head http": cluster.nodes[port_of[pipeline[0]]].pid}
    last_http = cluster.nodes[port_of[pipeline[-1]]].pid
    by_pid = {t["pid"]: t for t in traces}
    out = {role: by_pid[pid] for role, pid in pids.items() if pid in by_pid}
    for t in traces:
        if "parallax.node.executor" in " ".join(t["argv"]) or t["argv"][0].endswith(
                "executor.py"):
            if t["ppid"] == pids["head http"]:
                out["head executor"] = t
            elif t["ppid"] == last_http:
                out["last executor"] = t
    missing = set(ROLES) - set(out)
    assert not missing, f"no call trace of {missing}; pids {pids}, traces of " \
                        f"{[(t['pid'], t['ppid'], t['argv'][:2]) for t in traces]}"
    return out


def first_call(trace: dict, file: str, func: str) -> float | None:
    """When `file:func` was first called in this trace (`func` may omit the class)."""
    for when, name in trace["calls"]:
        got_file, _, qualname = name.partition(":")
        if got_file == file and (qualname == func or qualname.endswith("." + func)):
            return when
    return None


def stream_one_request(url: str) -> list:
    body = {"model": "default", "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        return list(parse_sse_lines(r.iter_lines()))


def test_one_request_follows_the_documented_path(tmp_path_factory):
    hops = doc_hops()
    tmp = tmp_path_factory.mktemp("request-path")
    trace_dir = tmp / "calls"
    with running(TracedCluster(tmp, trace_dir), START_TIMEOUT_S) as cluster:
        # no request before: a thread it started (the HTTP server's render pool) would run
        # unhooked (parallax/_calltrace.py hooks threads started after the first epoch)
        new_epoch(trace_dir, "idle", 5)
        time.sleep(IDLE_S)
        idle = {t["pid"]: {name for _, name in t["calls"]} for t in read_traces(trace_dir)}
        new_epoch(trace_dir, "request", 5)
        started = time.time()
        events = stream_one_request(cluster.url)
        assert events[-1] == "[DONE]"
        time.sleep(1.0)  # a few flushes
        roles = roles_of(read_traces(trace_dir), cluster)

    problems, previous = [], (started, "the request was sent")
    for number, role, file, func in hops:
        when = first_call(roles[role], file, func)
        hop = f"{number}. [{role}] {file}:{func}"
        if when is None:
            problems.append(f"{hop}: never called in the {role} process")
        elif when < previous[0]:
            problems.append(f"{hop}: first called {previous[0] - when:.3f} s before "
                            f"{previous[1]}")
        else:
            previous = (when, hop)
    assert not problems, "docs/architecture.md's request path is not what the code does:\n" + \
        "\n".join(problems)

    modules = set()
    for trace in roles.values():
        noise = idle.get(trace["pid"], set())
        modules |= {name.partition(":")[0] for when, name in trace["calls"]
                    if when >= started and name not in noise}
    print(f"\nthe request entered {len(modules)} project modules:\n  " +
          "\n  ".join(sorted(modules)))
    assert {h[2] for h in hops} <= modules
