"""Two nodes that cannot reach each other, only the scheduler: activations go through Lattica.

Inside the isolated namespace of this suite, each node gets its own network namespace joined
to the scheduler's by a veth pair (10.77.1.0/24 and 10.77.2.0/24, no forwarding between
them). A node's tcp probe of the other's activation endpoint fails, so its agent opens a
Lattica relay (straight to the peer when Lattica can dial it, else through the scheduler's
peer), and the greedy answers must still equal the whole model.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import require
from processes import die_with_pytest
from test_cluster import (  # noqa: F401 (reference_answers is a fixture)
    assert_greedy_answers,
    kill_node_mid_stream,
    reference_answers,
    running,
    split_memory,
)

from p2p.test_p2p_cluster import P2PCluster

pytestmark = pytest.mark.slow

SUBNETS = ("10.77.1", "10.77.2")


def sh(command: str) -> None:
    subprocess.run(["sh", "-c", command], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def namespaces():
    """Two node namespaces linked only to this one; skipped where veth/netns are unavailable."""
    names = [f"pxn{i}-{os.getpid() % 10000}" for i in range(2)]
    try:
        for i, (name, subnet) in enumerate(zip(names, SUBNETS, strict=True)):
            sh(f"mkdir -p /run/netns && ip netns add {name}")
            sh(f"ip link add vs{i} type veth peer name vn{i} && ip link set vn{i} netns {name}")
            sh(f"ip addr add {subnet}.1/24 dev vs{i} && ip link set vs{i} up")
            sh(f"ip netns exec {name} sh -c 'ip link set lo up && "
               f"ip addr add {subnet}.2/24 dev vn{i} && ip link set vn{i} up'")
    except (subprocess.CalledProcessError, OSError) as exc:
        require(False, f"cannot build veth-linked namespaces here: {exc}")
    yield names
    for i, name in enumerate(names):
        subprocess.run(["ip", "link", "del", f"vs{i}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class SplitCluster(P2PCluster):
    """Scheduler here; node i in namespace i, reachable from the scheduler only."""

    def __init__(self, tmp_path, namespaces: list[str]) -> None:
        self.namespaces = namespaces
        self.started = 0
        super().__init__(tmp_path, num_nodes=2, memory=split_memory())

    def start_node(self, port: int) -> subprocess.Popen:
        index = self.started
        self.started += 1
        subnet = SUBNETS[index]
        log = open(self.tmp_path / f"node-{port}.log", "ab")
        args = ["join", "-s", f"/ip4/{subnet}.1/tcp/{self.p2p_port}/p2p/{self.peer_id}",
                "--host", f"{subnet}.2", "--port", str(port), "--activation-port",
                str(port + 1), "--memory", self.memory, "--max-batch-size", "8", "--no-warmup",
                *self.node_args()]
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[index], sys.executable,
                                 "-m", "parallax.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env,
                                preexec_fn=die_with_pytest)


@pytest.fixture(scope="module")
def split_cluster(tmp_path_factory, namespaces):
    with running(SplitCluster(tmp_path_factory.mktemp("split"), namespaces)) as cluster:
        yield cluster


def test_nodes_cannot_reach_each_other(namespaces):
    def connect(namespace: str, address: str) -> subprocess.CompletedProcess:
        code = f"import socket; socket.create_connection(('{address}', 9), 2)"
        return subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=20)

    # the scheduler's side answers (refused: nobody listens on port 9), the other node does not
    assert "ConnectionRefusedError" in connect(namespaces[0], "10.77.1.1").stderr
    assert "unreachable" in connect(namespaces[0], "10.77.2.2").stderr


def test_activations_through_lattica_give_the_same_answers(split_cluster, reference_answers):  # noqa: F811
    status = split_cluster.status()
    assert len(status["pipelines"]) == 1 and len(status["pipelines"][0]) == 2
    assert_greedy_answers(split_cluster, reference_answers)
    # both nodes found the other unreachable and relayed through Lattica
    logs = [(split_cluster.tmp_path / f"node-{port}.log").read_text()
            for port in split_cluster.node_ports]
    assert all("not reachable over tcp: activations to peer" in log for log in logs), logs


def test_killed_tail_behind_a_relay_fails_the_stream_fast(split_cluster):
    """The head sends nothing while it waits for the tail's token: the relay's ping notices."""
    tail_id = split_cluster.status()["pipelines"][0][-1]
    tail_port = next(p for p in split_cluster.node_ports if tail_id.endswith(f"-{p}"))
    assert kill_node_mid_stream(split_cluster, tail_port, events_before=3) < 10.0
