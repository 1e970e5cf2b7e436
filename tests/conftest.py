"""Fixtures and helpers shared by several test modules."""

import importlib
import os
from types import ModuleType

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
