"""parallax/_calltrace.py: first calls of project functions, per epoch, in order; off when unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    from parallax import _calltrace
    from parallax.scheduler import water_fill as wf
    from parallax.scheduler.wait_queue import WaitQueue
    _calltrace.install()
    directory = os.environ.get("PARALLAX_TRACE_CALLS")
    wf.water_fill(4, [1.0], [4])  # before any epoch: not recorded
    if directory:
        open(os.path.join(directory, "epoch"), "w").write("one")
        time.sleep(0.6)  # the flush thread sees the epoch and hooks this thread
    wf.water_fill(4, [1.0, 2.0], [4, 4])
    wf.water_fill(4, [1.0, 2.0], [4, 4])  # a second call adds nothing
    thread = threading.Thread(target=WaitQueue, args=(4,))  # a thread started after it
    thread.start(); thread.join()
    print(sys.getprofile() is None)
""")


def run(tmp_path, env_dir: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PARALLAX_TRACE_CALLS"}
    if env_dir:
        env["PARALLAX_TRACE_CALLS"] = env_dir
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=60, check=True).stdout


def test_unset_installs_nothing(tmp_path):
    assert run(tmp_path, None).strip() == "True"


def test_records_first_calls_after_the_epoch_in_order_in_every_thread(tmp_path):
    assert run(tmp_path, str(tmp_path)).strip() == "False"
    [path] = tmp_path.glob("calls-*.json")
    trace = json.loads(path.read_text())
    names = [name for _, name in trace["calls"]]
    assert trace["epoch"] == "one"
    assert names[0] == "parallax/scheduler/water_fill.py:water_fill"
    functions = [n for n in names if "<" not in n]  # (comprehensions share a qualname)
    assert len(functions) == len(set(functions))  # first calls only
    assert names[-1] == "parallax/scheduler/wait_queue.py:WaitQueue.__init__"
    times = [t for t, _ in trace["calls"]]
    assert times == sorted(times)
