"""Test-only call tracing: which project functions a process entered, first calls in order.

With `PARALLAX_TRACE_CALLS=<dir>` set, `install()` (called first thing by every process entry
point: `parallax.cli.main`, `parallax.node.executor.main`) starts a daemon thread that waits
for a test to write an epoch to `<dir>/epoch`. At the first epoch it hooks `sys.setprofile` in
the main thread and `threading.setprofile` for threads started from then on (threads started
before stay unhooked), recording the first call of every function defined under the
`parallax` package as `[wall_time_s, "parallax/<file>.py:<qualname>"]`; each new epoch starts
the recording over (every function counts as not yet called), so a test records one request,
not the process's start. The thread rewrites `<dir>/calls-<pid>.json` every
`FLUSH_INTERVAL_S` (and at exit), so a killed process still leaves what it saw.
`tests/test_request_path.py` checks the request path of docs/architecture.md against these
files. Unset (always, outside that test): nothing is installed and nothing costs anything.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time
from types import CodeType, FrameType
from typing import Any

ENV = "PARALLAX_TRACE_CALLS"
FLUSH_INTERVAL_S = 0.2
HOOK_SIGNAL = signal.SIGUSR2
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _Recorder:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, f"calls-{os.getpid()}.json")
        self.seen: set[CodeType] = set()  # every code object met once, project or not
        self.calls: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.written = -1
        self.epoch = ""
        self.epoch_path = os.path.join(directory, "epoch")

    def profile(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event != "call":
            return
        code = frame.f_code
        if code in self.seen:
            return
        self.seen.add(code)
        filename = code.co_filename
        if filename.startswith(_PACKAGE_DIR) and not filename.endswith("_calltrace.py"):
            name = "parallax/" + filename[len(_PACKAGE_DIR):].replace(os.sep, "/")
            self.calls.append((time.time(), f"{name}:{code.co_qualname}"))

    def new_epoch(self) -> None:
        """Start over when the test wrote a new epoch; the first one hooks the main thread."""
        try:
            with open(self.epoch_path) as f:
                epoch = f.read().strip()
        except OSError:
            return
        if epoch != self.epoch:
            self.seen, self.calls = set(), []
            if not self.epoch:  # threads started from now on, and the main thread (its
                # signal handler runs there, between two bytecodes)
                threading.setprofile(self.profile)
                signal.pthread_kill(threading.main_thread().ident, HOOK_SIGNAL)
            self.epoch, self.written = epoch, -1

    def flush(self) -> None:
        with self.lock:
            calls = list(self.calls)
            if len(calls) == self.written:
                return
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv,
                           "epoch": self.epoch, "calls": calls}, f)
            os.replace(tmp, self.path)
            self.written = len(calls)

    def flush_loop(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL_S)
            try:
                self.new_epoch()
                self.flush()
            except OSError:
                return  # the directory is gone: the test that wanted it is over


def install() -> None:
    """Start recording when `PARALLAX_TRACE_CALLS` names a directory; otherwise do nothing."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    recorder = _Recorder(directory)
    # nothing is hooked until the first epoch: profiling every call of a model or tokenizer
    # load slows it many times over
    signal.signal(HOOK_SIGNAL, lambda *_: sys.setprofile(recorder.profile))
    threading.Thread(target=recorder.flush_loop, name="calltrace", daemon=True).start()
    atexit.register(recorder.flush)
