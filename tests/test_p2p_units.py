"""P2P mode pieces that need no Lattica peer: targets, config, peer lists, link aliases,
the restricted unpickler."""

from __future__ import annotations

import os
import pickle
import time

import pytest
import zmq
from processes import free_port

from parallax.config import ChatConfig, ConfigError, JoinConfig, SchedulerConfig
from parallax.node.link_auth import LinkSecurity
from parallax.node.links import LinkLimits, PipelineLinks
from parallax.p2p.peer import is_p2p_target, split_target
from parallax.p2p.safety import restricted_loads
from parallax.protocol.common import encode
from parallax.protocol.control import Heartbeat, NodeJoin, PeerEndpoint
from parallax.protocol.links import LinkRelease, decode_link
from parallax.protocol.p2p import RelayedMessage
from parallax.scheduler.app import SchedulerState
from parallax.scheduler.catalog import ModelCatalog

PEER = "12D3KooWGzh8g2xJvDbCFGXpQ4L7t6P1vMJVsa5xr5fNCGdkzYyq"
MADDR = f"/ip4/10.0.0.5/tcp/3003/p2p/{PEER}"


def test_targets_are_parsed():
    assert split_target(PEER) == (PEER, None)
    assert split_target(MADDR) == (PEER, MADDR)
    assert is_p2p_target(PEER) and is_p2p_target(MADDR)
    for not_p2p in ("10.0.0.5:3001", "localhost:3001", "12D3KooW", "", None,
                    "/ip4/10.0.0.5/tcp/3003"):
        assert not is_p2p_target(not_p2p)
    with pytest.raises(ValueError, match="peer id"):
        split_target("10.0.0.5:3001")


def test_config_accepts_peers_and_names_the_fix():
    assert JoinConfig(scheduler=MADDR, relays=(MADDR,)).scheduler == MADDR
    assert ChatConfig(scheduler=PEER).scheduler == PEER
    with pytest.raises(ConfigError, match="peer id or a /p2p/ multiaddr"):
        JoinConfig(scheduler="not an address")
    with pytest.raises(ConfigError, match="--relay must be a multiaddr"):
        SchedulerConfig(p2p=True, relays=("10.0.0.9:4001",))
    with pytest.raises(ConfigError, match="--p2p-port"):
        SchedulerConfig(p2p=True, p2p_port=70000)


def _join(state: SchedulerState, node_id: str, peer_id: str | None) -> None:
    state.join(NodeJoin(node_id, "cpu", "cpu", 2**30, 100.0, 10.0, f"http://{node_id}:3000",
                        f"tcp://{node_id}:3100", peer_id=peer_id))


def test_heartbeats_tell_p2p_nodes_about_the_other_p2p_nodes():
    state = SchedulerState(SchedulerConfig(mdns=False),
                           catalog=ModelCatalog(known={}, curated={}, include_builtin=False))
    _join(state, "a", PEER)
    _join(state, "b", PEER.replace("G", "H"))
    _join(state, "direct", None)
    answer = state.heartbeat(Heartbeat("a", "idle"))
    assert answer.peers == [PeerEndpoint("tcp://b:3100", PEER.replace("G", "H"), ready=False)]
    assert state.heartbeat(Heartbeat("direct", "idle")).peers == []


def test_aliased_endpoint_is_sent_to_its_relay():
    context = zmq.Context.instance()
    relay = context.socket(zmq.PULL)
    relay_address = f"ipc:///tmp/parallax-test-relay-{os.getpid()}"
    relay.bind(relay_address)
    unreachable = "tcp://10.255.255.1:9"  # never dialled: the alias replaces it
    links = PipelineLinks(context, f"tcp://127.0.0.1:{free_port()}", "tcp://self:1",
                          LinkLimits(8, 64, 128, 100),
                          LinkSecurity(bytes(32), [unreachable]))
    try:
        links.set_aliases({unreachable: relay_address})
        links.send_message(unreachable, LinkRelease(["r1"]))
        deadline = time.monotonic() + 5
        while not relay.poll(10) and time.monotonic() < deadline:
            links.flush()  # sends never block: a link still connecting is flushed by the loop
        assert relay.poll(0)
        frames = relay.recv_multipart()
        assert decode_link(frames[1]) == LinkRelease(["r1"])  # frame 0: the seal
        # dropping the alias reconnects to the endpoint itself (nothing more reaches the relay)
        links.set_aliases({})
        assert unreachable not in links.pushes
    finally:
        links.close()
        relay.close(linger=0)


class _Boom:
    def __reduce__(self):
        return (time.sleep, (30,))


def test_restricted_unpickler_refuses_every_global():
    assert restricted_loads(pickle.dumps([1, "a", b"b", {"k": (1.5, None)}])) == [
        1, "a", b"b", {"k": (1.5, None)}]
    for crafted in (pickle.dumps(_Boom()), pickle.dumps(set), pickle.dumps(os.getcwd)):
        with pytest.raises(pickle.UnpicklingError, match="refused to unpickle"):
            restricted_loads(crafted)


def test_probe_tells_open_from_refused():
    import asyncio
    import socket

    from parallax.p2p.relay import probe_tcp

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        open_port = listening.getsockname()[1]
        assert asyncio.run(probe_tcp(f"tcp://127.0.0.1:{open_port}")) == "open"
    assert asyncio.run(probe_tcp(f"tcp://127.0.0.1:{free_port()}")) == "refused"
    # "unreachable" (no route) is what tests/p2p/test_p2p_fallback.py's namespaces produce


class _FakeRelay:
    def __init__(self) -> None:
        self.opened: list[tuple[str, str]] = []
        self.closed: list[str] = []

    def open(self, endpoint: str, peer_id: str) -> str:
        self.opened.append((endpoint, peer_id))
        return f"ipc:///tmp/relay-{len(self.opened)}"

    def close_endpoint(self, endpoint: str) -> None:
        self.closed.append(endpoint)


def test_relayed_links_follow_the_probes():
    import asyncio
    import socket

    from parallax.p2p.relay import RelayedLinks

    relay = _FakeRelay()
    links = RelayedLinks(relay, say=lambda _: None)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        open_endpoint = f"tcp://127.0.0.1:{listening.getsockname()[1]}"
        closed_endpoint = f"tcp://127.0.0.1:{free_port()}"
        loading = PeerEndpoint(closed_endpoint, PEER, ready=False)
        direct = PeerEndpoint(open_endpoint, PEER.replace("G", "H"), ready=True)
        own = PeerEndpoint("tcp://127.0.0.1:1", PEER.replace("G", "J"), ready=True)
        # a peer still loading (refused, not ready) is left for the next heartbeat
        assert asyncio.run(links.update([loading, direct, own], own.activation_endpoint)) is None
        assert relay.opened == [] and set(links.probed) == {open_endpoint}
        # ready but refusing: its port is blocked from here, so it gets a relay
        blocked = PeerEndpoint(closed_endpoint, PEER, ready=True)
        aliases = asyncio.run(links.update([blocked, direct], own.activation_endpoint))
        assert aliases == {closed_endpoint: "ipc:///tmp/relay-1"}
        assert relay.opened == [(closed_endpoint, PEER)]
        # nothing new: no change, no probe of known peers
        assert asyncio.run(links.update([blocked, direct], own.activation_endpoint)) is None
        # the relayed peer leaves: its relay closes and the alias goes
        assert asyncio.run(links.update([direct], own.activation_endpoint)) == {}
        assert relay.closed == [closed_endpoint]


# ---- activation relays admit only sealed, well-formed messages (issue 11 item 9) -------------


class _FakeLattica:
    """What ActivationRelay uses of a Lattica peer; calls to other peers are scripted."""

    def __init__(self, peer_id: str, answer=lambda data: b"ok") -> None:
        self.id = peer_id
        self.answer = answer
        self.calls: list[tuple[str, str]] = []

    def register_service(self, service) -> None:
        pass

    def peer_id(self) -> str:
        return self.id

    def get_client(self, target: str):
        peer = self

        class _Call:
            def __init__(self, method: str, data: bytes) -> None:
                peer.calls.append((target, method))
                self.data = data

            def result(self, timeout: float):
                return peer.answer(self.data)

        class _Client:
            def call_stream(self, method: str, data: bytes):
                return _Call(method, data)

        return _Client()


RELAY_KEY = bytes(range(32))


def _relayed(target: str, frames: list[bytes]) -> bytes:
    return encode(RelayedMessage(target, frames))


def _sealed(frames: list[bytes], key: bytes = RELAY_KEY) -> list[bytes]:
    from parallax.node.link_auth import LinkSecurity

    return [LinkSecurity(key, ()).seal(frames), *frames]


def test_a_node_relay_passes_on_only_sealed_messages_for_it():
    from parallax.p2p.relay import ActivationRelay

    context = zmq.Context.instance()
    executor = context.socket(zmq.PULL)
    address = f"ipc:///tmp/parallax-test-relay-in-{os.getpid()}"
    executor.bind(address)
    relay = ActivationRelay(_FakeLattica(PEER), address)
    release = [encode(LinkRelease(["r1"]))]
    try:
        good = _sealed(release)
        refused = {
            "no key yet": _relayed(PEER, good),
            "garbage": b"\x00garbage",
            "another target": _relayed(PEER.replace("G", "H"), good),
            "5 frames": _relayed(PEER, [b"x"] * 5),
            "unsigned": _relayed(PEER, [b"no seal", *release]),
            "wrong key": _relayed(PEER, _sealed(release, bytes(32))),
        }
        for case, data in refused.items():
            assert relay.on_push(data).startswith(b"error"), case
            if case == "no key yet":
                relay.set_link_key(RELAY_KEY.hex())
        assert not executor.poll(100)  # nothing reached the executor
        assert relay.on_push(_relayed(PEER, [])) == b"ok"  # a ping
        assert relay.on_push(_relayed(PEER, good)) == b"ok"
        assert executor.poll(2000) and executor.recv_multipart() == good
        assert relay.on_push(_relayed(PEER, good)).startswith(b"error: refused: replayed")
    finally:
        relay.close()
        executor.close(linger=0)


def test_the_scheduler_relay_forwards_only_to_joined_peers_and_never_waits_long(monkeypatch):
    import threading

    from parallax.p2p import relay as relay_module

    gate = threading.Event()
    lattica = _FakeLattica("scheduler", answer=lambda data: gate.wait(5) and b"ok")
    relay = relay_module.ActivationRelay(lattica)
    release = [encode(LinkRelease(["r1"]))]
    stranger = PEER.replace("G", "H")
    assert relay.on_forward(_relayed(PEER, _sealed(release))).startswith(b"error: refused")
    relay.forward_keys = lambda peer: [RELAY_KEY] if peer == PEER else None
    for data in (_relayed(stranger, _sealed(release)), _relayed(stranger, []),
                 _relayed(PEER, [b"no seal", *release]), _relayed(PEER, _sealed(release, bytes(32))),
                 b"\x00", _relayed(PEER, [b"x"] * 4)):
        assert relay.on_forward(data).startswith(b"error"), data[:40]
    assert lattica.calls == []  # nothing refused was passed on
    monkeypatch.setattr(relay_module, "MAX_RELAY_BYTES", 1000)
    assert b"too large" in relay.on_forward(_relayed(PEER, [b"x" * 600, b"y" * 600]))
    monkeypatch.setattr(relay_module, "LOCK_WAIT_S", 0.2)
    # one caller's call hangs: another caller to the same target is answered "busy" at once
    first = threading.Thread(target=relay.on_forward, args=(_relayed(PEER, _sealed(release)),))
    first.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert relay.on_forward(_relayed(PEER, _sealed(release))).startswith(b"error: busy")
    assert time.monotonic() - started < 1.0
    gate.set()
    first.join(5)
    assert relay.on_forward(_relayed(PEER, _sealed(release))) == b"ok"
    assert lattica.calls == [(PEER, relay_module.PUSH_METHOD)] * 2


def test_the_p2p_join_command_dials_the_peer_or_goes_through_the_relays():
    from parallax.p2p.roles import P2PPeer
    from parallax.scheduler.status import p2p_join_command

    class Lattica:  # what the command reads of a running peer
        visible = ["/ip4/10.0.0.5/tcp/3003"]

        def peer_id(self) -> str:
            return PEER

        def get_visible_maddrs(self) -> list[str]:
            return self.visible

    peer = P2PPeer(Lattica())
    assert p2p_join_command(peer, "192.168.1.2", 3003, ()) == f"parallax join -s {MADDR}"
    peer.peer.visible = []  # nothing dialable seen yet: the host it was told
    assert p2p_join_command(peer, "192.168.1.2", 3003, ()) == \
        f"parallax join -s /ip4/192.168.1.2/tcp/3003/p2p/{PEER}"
    relay = "/dns4/relay.example/tcp/4001/p2p/" + PEER
    assert p2p_join_command(peer, "h", 3003, (relay, relay)) == \
        f"parallax join -s {PEER} --relay {relay} --relay {relay}"
