"""Fixtures shared by several test modules."""

import faulthandler
import os
import sys

import parallax  # noqa: F401  (sets OpenMP's wait policy before torch loads libgomp)

# isort: split
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run the module with one torch thread (timing-free numerics, no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A test stuck in C code (a lock, a native barrier) never sees pytest-timeout's SIGALRM: this
# watchdog prints every thread's stack and ends the run, so CI fails fast and says where.
HARD_LIMIT_GRACE_S = 120


def _real_stderr():
    """The terminal's stderr, not pytest's capture file (gone once the process exits)."""
    global _STDERR
    if _STDERR is None:
        _STDERR = os.fdopen(os.dup(sys.__stderr__.fileno()), "w")
    return _STDERR


_STDERR = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    marker = item.get_closest_marker("timeout")
    limit = marker.args[0] if marker and marker.args else item.config.getini("timeout")
    faulthandler.dump_traceback_later(float(limit or 300) + HARD_LIMIT_GRACE_S, exit=True,
                                      file=_real_stderr())
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
