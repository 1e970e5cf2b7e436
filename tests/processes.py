"""Helpers for tests that start servers: free loopback ports, children that die with pytest."""

from __future__ import annotations

import ctypes
import signal
import socket
import sys


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_pytest() -> None:
    """preexec_fn for server children: SIGTERM when pytest dies, so none outlives a killed run."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
