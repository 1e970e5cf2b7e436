"""The loopback cluster of tests/test_cluster.py, joined over Lattica instead of HTTP.

The scheduler runs `--p2p`; nodes join with `-s /ip4/127.0.0.1/tcp/PORT/p2p/<peer id>`, so
their join, heartbeats, leave and the scheduler's chat forwarding all travel as Lattica
streams. The same tests must pass: greedy answers equal the whole model (which is what direct
mode answers), and a killed node fails its request fast and the cluster heals.
Runs only inside an isolated network namespace (see conftest.py).
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from processes import free_port
from test_cluster import (  # noqa: F401 (the fixture and tests run here again, over P2P)
    PROMPTS,
    START_TIMEOUT_S,
    LocalCluster,
    reference_answers,
    split_memory,
    test_greedy_answers_equal_whole_model,
    test_killed_node_fails_in_flight_request_then_cluster_heals,
    test_split_across_two_nodes_with_a_standby,
)

pytestmark = pytest.mark.slow

JOIN_TOKEN = "p2p-secret"


class P2PCluster(LocalCluster):
    """The scheduler runs --p2p; nodes join by its multiaddr on loopback."""

    def __init__(self, tmp_path, num_nodes: int, memory: str) -> None:
        self.p2p_port = free_port()
        self.started_at = time.monotonic()
        super().__init__(tmp_path, num_nodes, memory)

    def scheduler_args(self) -> list[str]:
        self.env["PARALLAX_P2P_HOME"] = str(self.tmp_path / "keys")
        return ["--p2p", "--p2p-port", str(self.p2p_port), "--join-token", JOIN_TOKEN]

    def node_args(self) -> list[str]:
        return ["--join-token", JOIN_TOKEN]

    def scheduler_target(self) -> str:
        deadline = time.monotonic() + 60
        while True:
            try:
                command = httpx.get(f"{self.url}/node/join/command", timeout=5).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the P2P scheduler never came up"
                time.sleep(0.3)
        self.join_command = command["data"]["command"]
        self.peer_id = re.search(r"/p2p/(12D3KooW\w+)", self.join_command).group(1)
        return f"/ip4/127.0.0.1/tcp/{self.p2p_port}/p2p/{self.peer_id}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = P2PCluster(tmp_path_factory.mktemp("p2p-cluster"), num_nodes=3, memory=split_memory())
    try:
        cluster.wait_status({"available"}, START_TIMEOUT_S)
        cluster.ready_after_s = time.monotonic() - cluster.started_at
        yield cluster
    finally:
        cluster.close()


def test_nodes_joined_over_p2p(cluster):
    assert cluster.join_command.startswith("parallax join -s /ip4/")
    nodes = cluster.status()["node_list"]
    assert len(nodes) == 3
    # every node reached the scheduler through Lattica only: its join carried a peer id, and
    # the scheduler log names the P2P peer it serves on
    log = (cluster.tmp_path / "scheduler.log").read_text()
    assert "P2P peer 12D3KooW" in log
    for port in cluster.node_ports:
        node_log = (cluster.tmp_path / f"node-{port}.log").read_text()
        assert "P2P peer 12D3KooW" in node_log and f"joined {cluster.peer_id}" in node_log
    print(f"P2P cluster available {cluster.ready_after_s:.1f} s after the scheduler started")


@pytest.fixture(scope="module")
def client_peer(cluster):
    """A Lattica peer in this process that dials the scheduler, as `parallax chat -s` does."""
    from parallax.p2p.roles import start_client_peer

    peer, scheduler_peer_id = start_client_peer(free_port(), cluster.join_target, ())
    assert scheduler_peer_id == cluster.peer_id
    yield peer
    peer.close()


def test_scheduler_is_published_in_the_dht(cluster, client_peer):
    from parallax.p2p.roles import read_scheduler_record

    deadline = time.monotonic() + 20
    record = None
    while record is None and time.monotonic() < deadline:
        record = read_scheduler_record(client_peer, cluster.peer_id)
        time.sleep(0.2)
    assert record is not None, "no scheduler record in the DHT"
    assert record.peer_id == cluster.peer_id and record.model == "SmolLM2-135M-Instruct"
    assert all(a.endswith(f"/p2p/{cluster.peer_id}") for a in record.addresses)


def test_join_token_applies_over_p2p(cluster, client_peer):
    from parallax.p2p.bridge import LatticaTransport

    async def join(token: str | None) -> httpx.Response:
        headers = {"X-Join-Token": token} if token else {}
        async with httpx.AsyncClient(base_url="http://scheduler.p2p", timeout=10,
                                     transport=LatticaTransport(client_peer.peer,
                                                                cluster.peer_id)) as client:
            # a malformed join: with the right token it would be a 400, never a new node
            return await client.post("/node/join", json={}, headers=headers)

    assert asyncio.run(join(None)).status_code == 401
    assert asyncio.run(join("wrong")).status_code == 401
    assert asyncio.run(join(JOIN_TOKEN)).status_code in (400, 422)


def test_bridged_calls_are_never_the_scheduler_machine(cluster, client_peer):
    """The bridge replays a peer's call from 127.0.0.1, marked as relayed: a stranger who knows
    the peer id gets no operator rights (this scheduler has no API key) and never the token."""
    from parallax.p2p.bridge import LatticaTransport

    async def calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url="http://scheduler.p2p", timeout=30,
                                     transport=LatticaTransport(client_peer.peer,
                                                                cluster.peer_id)) as client:
            forged = {"X-Parallax-Relayed": "", "Host": "127.0.0.1"}  # replaced by the bridge
            return [await client.post("/scheduler/init", headers=forged, json={
                        "model_name": "SmolLM2-135M-Instruct", "init_nodes_num": 10000}),
                    await client.get("/node/join/command", headers=forged),
                    await client.get("/cluster/status_json")]

    init, command, status = asyncio.run(calls())
    assert init.status_code == 403 and init.json()["object"] == "error"
    assert command.json()["data"]["command"].endswith("--join-token <token>")
    assert "--join-token <token>" in status.text
    assert all(JOIN_TOKEN not in r.text for r in (init, command, status))
    assert cluster.status()["init_nodes_num"] == 2  # nothing changed


def test_chat_server_reaches_the_scheduler_by_peer(cluster, reference_answers):  # noqa: F811
    port = free_port()
    chat = cluster._spawn("chat", ["chat", "-s", cluster.join_target, "--port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                status = httpx.get(f"{url}/cluster/status_json", timeout=10).json()["data"]
                break
            except httpx.HTTPError:
                assert chat.poll() is None and time.monotonic() < deadline, "chat never came up"
                time.sleep(0.3)
        assert len(status["node_list"]) == 3
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": PROMPTS[0]}], "temperature": 0,
            "max_tokens": 24}).json()
        assert answer["choices"][0]["message"]["content"] == reference_answers[0]
    finally:
        chat.terminate()
        chat.wait(10)


def test_everything_stops_promptly_on_sigterm(cluster):
    """Scheduler and nodes stopped together: a node's leave meets a peer that is going away
    (Lattica's cancel/close calls then block for good unless bounded). Runs last."""
    processes = [*cluster.nodes.values(), cluster.scheduler]
    started = time.monotonic()
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(max(0.1, 20 - (time.monotonic() - started)))  # TimeoutExpired fails it
    assert time.monotonic() - started < 20
