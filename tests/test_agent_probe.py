"""The node agent measures the peers its heartbeat answers list and reports them (mocked HTTP)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import msgspec

from parallax.config import JoinConfig
from parallax.node import probe
from parallax.node.agent import NodeAgent
from parallax.protocol.control import (
    Heartbeat,
    HeartbeatResponse,
    LinkReport,
    NodeJoin,
    ProbeTarget,
)
from parallax.protocol.ipc import ExecutorStats


class FakeClient:
    """Just what NodeAgent.heartbeat and _heartbeat read from an executor client."""

    stats = ExecutorStats()
    info = None
    state = "idle"
    error = None
    link_key_id = ""

    def set_link_security(self, *_args) -> None:
        pass


def test_heartbeats_report_the_listed_peers_measurements() -> None:
    seen: list[Heartbeat] = []

    def scheduler(request: httpx.Request) -> httpx.Response:
        seen.append(msgspec.json.decode(request.content, type=Heartbeat))
        answer = HeartbeatResponse(known=True, probe_peers=[
            ProbeTarget("peer", "http://peer:3000"), ProbeTarget("gone", "http://gone:1")])
        return httpx.Response(200, content=msgspec.json.encode(answer))

    async def peer_body(size: int):
        yield bytes(size)

    def peers(request: httpx.Request) -> httpx.Response:
        if request.url.host == "gone":
            raise httpx.ConnectError("refused")
        size = probe.PROBE_BYTES if request.url.path == "/node/probe" else 16
        return httpx.Response(200, content=peer_body(size))

    async def main() -> None:
        join = NodeJoin("me", "cpu", "cpu", 2**30, 1.0, 1.0, "http://me:3000", "tcp://me:3100")
        agent = NodeAgent(JoinConfig(), FakeClient(), SimpleNamespace(ready=False), join,
                          "http://scheduler", "tcp://*:3100", say=lambda _m: None,
                          transport=httpx.MockTransport(scheduler))
        agent._peer_http = httpx.AsyncClient(transport=httpx.MockTransport(peers))
        assert await agent._heartbeat()
        await asyncio.wait_for(_until(lambda: agent._link_reports), 5)
        assert await agent._heartbeat()
        await agent._peer_http.aclose()
        agent._probe_task.cancel()

    asyncio.run(main())
    first, second = seen
    assert first.links == [] and first.scheduler_rtt_ms == 0.0
    assert [r.node_id for r in second.links] == ["peer"]  # the unreachable one is left out
    assert second.links[0].bandwidth_mbps > 0 and second.scheduler_rtt_ms > 0


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_link_history_reports_the_best_of_recent_rounds() -> None:
    history = probe.LinkHistory(rounds=2)
    first = history.update([LinkReport("a", 3.0, 90.0), LinkReport("b", 8.0, 10.0)],
                           ["a", "b"])
    assert first == [LinkReport("a", 3.0, 90.0), LinkReport("b", 8.0, 10.0)]
    # a busy round: load only adds delay, so the earlier round's figures stand
    busy = history.update([LinkReport("a", 70.0, 20.0)], ["a", "b"])
    assert busy == [LinkReport("a", 3.0, 90.0), LinkReport("b", 8.0, 10.0)]
    # the link really got slower: once the good round is older than the window, it shows
    slow = history.update([LinkReport("a", 400.0, 5.0)], ["a"])
    assert slow == [LinkReport("a", 70.0, 20.0)]  # and "b", no longer listed, is dropped
    assert history.update([LinkReport("a", 400.0, 5.0)], ["a"]) == [
        LinkReport("a", 400.0, 5.0)]
