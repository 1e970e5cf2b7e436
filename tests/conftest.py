"""Fixtures and helpers shared by several test modules."""

import faulthandler
import importlib
import os
import sys
from types import ModuleType

# Every test runs several processes on two cores: OpenMP threads sleep at once while they wait
# (parallax/__init__.py explains), here and in the servers the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import parallax  # noqa: E402, F401  (before torch loads libgomp)

# isort: split
import pytest
import torch


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(condition: object, reason: str) -> None:
    """A prerequisite of the calling test (a browser, network namespaces): without it the test
    skips with `reason`, except in CI (`CI=true`), where a missing prerequisite fails it, so CI
    never passes by skipping what it is there to run. Usable at module level too."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, reason: str) -> ModuleType:
    """`import name`, or `require` fails/skips with `reason` when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require(False, f"{reason} ({exc})")
        raise  # not reached: require raised


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


@pytest.fixture(autouse=True)
def _fresh_fused_ops():
    """Tests switch PARALLAX_NATIVE_KERNELS with monkeypatch; the fused decode ops resolve their
    library once per process, so each test starts from the environment it sets."""
    from parallax.models import fused_ops

    fused_ops.refresh()
    yield
    fused_ops.refresh()
