"""mDNS: a node finds the scheduler advertised on this machine (zeroconf, loopback included)."""

from __future__ import annotations

import socket

from parallax.scheduler.discovery import Advertiser, find_scheduler


def test_node_finds_advertised_scheduler_on_the_same_machine():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        advertiser = Advertiser("0.0.0.0", port, model="SmolLM2-135M-Instruct")
        try:
            found = find_scheduler(timeout_s=10)
        finally:
            advertiser.close()
        assert found is not None and found.endswith(f":{port}")
        host = found.rsplit(":", 1)[0]
        with socket.create_connection((host, port), timeout=2):
            pass  # the address it chose is one we can really reach


def test_no_scheduler_means_none_after_the_timeout():
    assert find_scheduler(timeout_s=0.5) is None
