"""Which hosts a joining node may advertise (parallax/scheduler/admission.py): the pure rule,
the allow-list, the flag, and the scheduler's /node/join refusing a node that points the
cluster's traffic at a host other than its own (in-process, with the client address a remote
node would have). The same against a real process over a veth pair runs in
test_hardening_control.py (test_attacks_from_outside_loopback_and_through_chat)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from test_hardening_control import OUTSIDE, TOKEN, client, is_error, join_body, make_scheduler

from parallax import cli
from parallax.config import ConfigError, SchedulerConfig
from parallax.p2p.peer import PEER_HEADER
from parallax.protocol.control import NodeJoin
from parallax.scheduler.admission import (
    FLAG,
    AdvertiseAllowList,
    advertise_refusal,
    may_advertise,
)
from parallax.scheduler.app import SchedulerState
from parallax.serving.security import RELAYED_HEADER

NONE = AdvertiseAllowList()


# ---- the rule: the address the join came from -------------------------------------------------


@pytest.mark.parametrize("host, peer", [
    ("10.0.0.5", "10.0.0.5"),
    ("2001:db8::1", "2001:0db8:0:0::1"),  # one IPv6 address, two spellings
    ("[2001:db8::1]", "2001:db8::1"),  # as urlsplit may leave it, bracketed
    ("10.0.0.5", "::ffff:10.0.0.5"),  # a dual-stack socket reports an IPv4 client mapped
    ("fe80::1", "fe80::1%eth0"),  # a link-local peer with its zone
    ("127.0.0.1", "127.0.0.1"),
    ("localhost", "127.0.0.1"),  # every loopback form is this machine
    ("::1", "127.0.0.1"),
    ("127.0.0.2", "::1"),
    ("LOCALHOST", "::ffff:127.0.0.1"),
])
def test_a_node_may_advertise_the_address_it_joins_from(host, peer):
    assert may_advertise(host, peer, NONE)


@pytest.mark.parametrize("host, peer", [
    ("10.0.0.6", "10.0.0.5"),  # another machine on the same network
    ("127.0.0.1", "10.0.0.5"),  # the scheduler's own loopback, from a remote node: SSRF
    ("localhost", "10.0.0.5"),
    ("0.0.0.0", "10.0.0.5"),  # "every interface" reaches the scheduler's own ports too
    ("10.0.0.5", "127.0.0.1"),  # a local process naming a machine on the network
    ("2001:db8::2", "2001:db8::1"),
    ("node5.lan", "10.0.0.5"),  # a name is never resolved, so it equals no address
    ("10.0.0.5", None),  # the connection's address is unknown
    ("10.0.0.5", "testclient"),
])
def test_a_node_may_not_advertise_another_host(host, peer):
    assert not may_advertise(host, peer, NONE)


def test_a_node_beside_the_scheduler_may_advertise_its_lan_address():
    own = ("192.168.1.20",)
    assert may_advertise("192.168.1.20", "127.0.0.1", NONE, own)  # joined over loopback
    assert may_advertise("127.0.0.1", "192.168.1.20", NONE, own)  # joined at the LAN address
    assert not may_advertise("192.168.1.20", "192.168.1.30", NONE, own)  # a remote node
    assert not may_advertise("192.168.1.21", "127.0.0.1", NONE, own)
    assert not may_advertise("192.168.1.20", "127.0.0.1", NONE)  # not this machine's address


# ---- the allow-list ----------------------------------------------------------------------------


def test_allow_list_networks_addresses_and_names():
    allowed = AdvertiseAllowList.parse(["10.0.0.0/8", " 192.168.1.7 ", "fd00::/8", "GPU1.lan.",
                                        "*.corp.example"])
    for host in ("10.1.2.3", "10.255.255.255", "192.168.1.7", "fd12::9", "[fd12::9]",
                 "::ffff:10.9.9.9", "gpu1.lan", "GPU1.LAN.", "a.corp.example",
                 "b.c.corp.example"):
        assert allowed.allows(host), host
        assert may_advertise(host, "172.16.0.1", allowed), host  # whatever the connection
    for host in ("11.0.0.1", "192.168.1.8", "fe80::1", "gpu2.lan", "lan", "corp.example",
                 "evilcorp.example", "gpu1.lan.evil", "127.0.0.1"):
        assert not allowed.allows(host), host
        assert not may_advertise(host, "172.16.0.1", allowed), host


def test_allow_list_families_do_not_mix_and_mapped_networks_unmap():
    assert not AdvertiseAllowList.parse(["::/0"]).allows("10.0.0.1")
    assert not AdvertiseAllowList.parse(["0.0.0.0/0"]).allows("2001:db8::1")
    mapped = AdvertiseAllowList.parse(["::ffff:10.0.0.0/104"])
    assert mapped.allows("10.3.2.1") and not mapped.allows("11.0.0.1")


@pytest.mark.parametrize("entry", ["*", "10.0.0.5/8", "10.0.0.0/33", "http://10.0.0.5",
                                   "10.0.0.5:3000", "a b", "", "*.", "a..b/x"])
def test_allow_list_refuses_what_it_cannot_mean(entry):
    with pytest.raises(ValueError, match=FLAG):
        AdvertiseAllowList.parse([entry])
    with pytest.raises(ConfigError, match=FLAG):
        SchedulerConfig(allow_advertised_hosts=(entry,))


def test_the_flag_is_comma_separated_and_repeatable():
    parser = cli.build_parser()
    args = parser.parse_args(["run", "--allow-advertised-hosts", "10.0.0.0/8,gpu1.lan",
                              "--allow-advertised-hosts", "*.lan"])
    assert cli._hosts(args.allow_advertised_hosts) == ("10.0.0.0/8", "gpu1.lan", "*.lan")
    assert parser.parse_args(["run"]).allow_advertised_hosts == []


def test_the_refusal_names_the_hosts_and_both_fixes():
    message = advertise_refusal("n1", "10.0.0.9", "10.0.0.5", NONE)
    assert message is not None
    assert "'10.0.0.9'" in message and "10.0.0.5" in message and "n1" in message
    assert f"{FLAG} 10.0.0.9" in message and "--advertise-host" in message
    assert advertise_refusal("n1", "10.0.0.5", "10.0.0.5", NONE) is None


# ---- the scheduler's /node/join ----------------------------------------------------------------


FOREIGN = "10.0.0.9"  # a host the node at OUTSIDE wants the cluster to send traffic to


def foreign_join(node_id: str, http_host: str = FOREIGN, activation_host: str = FOREIGN,
                 **fields) -> dict:
    return join_body(node_id, http_url=f"http://{http_host}:22",
                     activation_endpoint=f"tcp://{activation_host}:22", **fields)


def test_join_with_a_foreign_host_is_refused_unless_the_operator_allows_it(caplog):
    async def main():
        state, app = make_scheduler(allow_advertised_hosts=())
        token = {"X-Join-Token": TOKEN}
        async with client(app, OUTSIDE, headers=token) as http:
            for node_id, body in (("http", foreign_join("http", activation_host=OUTSIDE)),
                                  ("act", foreign_join("act", http_host=OUTSIDE)),
                                  ("local", foreign_join("local", "127.0.0.1", "127.0.0.1"))):
                with caplog.at_level(logging.WARNING, logger="parallax.scheduler"):
                    answer = await http.post("/node/join", json=body)
                assert is_error(answer, 403), answer.text
                error = answer.json()
                assert set(error) == {"object", "message", "type", "code"}
                assert FLAG in error["message"] and OUTSIDE in error["message"]
                assert node_id not in state.registry.nodes
                assert any("join refused" in r.getMessage() and node_id in r.getMessage()
                           for r in caplog.records)
            own = await http.post("/node/join", json=foreign_join("own", OUTSIDE, OUTSIDE))
            assert own.status_code == 200, own.text
            assert state.registry.nodes["own"].http_url == f"http://{OUTSIDE}:22"

        state, app = make_scheduler(allow_advertised_hosts=("10.0.0.0/24",))
        async with client(app, OUTSIDE, headers=token) as http:
            allowed = await http.post("/node/join", json=foreign_join("nat"))
            assert allowed.status_code == 200, allowed.text
            assert state.registry.nodes["nat"].activation_endpoint == f"tcp://{FOREIGN}:22"
            beyond = await http.post("/node/join", json=foreign_join("far", "10.0.1.9"))
            assert is_error(beyond, 403)

    asyncio.run(main())


def test_only_a_p2p_join_relayed_by_the_bridge_skips_the_address_check():
    """The P2P bridge replays a remote peer's join from loopback, marked "p2p": the address
    is unknown, and the scheduler reaches that node by peer id. The marker from a remote
    address gets the normal check; any other relayed join came from our proxy's loopback
    address, not the node's, so only the allow-list admits it (not even loopback: that would
    aim the scheduler at its own ports)."""
    async def main():
        state, app = make_scheduler(allow_advertised_hosts=())
        bridged = {"X-Join-Token": TOKEN, RELAYED_HEADER: "p2p"}
        async with client(app, "127.0.0.1", headers=bridged) as http:
            p2p = await http.post("/node/join", json=foreign_join("p2p", peer_id="12D3KooWx"))
            assert p2p.status_code == 200, p2p.text
            for host in (FOREIGN, "127.0.0.1"):
                no_peer = await http.post("/node/join", json=foreign_join("nopeer", host, host))
                assert is_error(no_peer, 403), host
        async with client(app, OUTSIDE, headers=bridged) as http:
            forged = await http.post("/node/join", json=foreign_join("forged", peer_id="12D3x"))
            assert is_error(forged, 403)
        async with client(app, "127.0.0.1", headers={"X-Join-Token": TOKEN,
                                                     RELAYED_HEADER: "chat"}) as http:
            chat = await http.post("/node/join", json=foreign_join("chat", peer_id="12D3x"))
            assert is_error(chat, 403)
        assert set(state.registry.nodes) == {"p2p"}

    asyncio.run(main())


def test_a_bridged_join_cannot_choose_its_address_with_forwarding_headers():
    """uvicorn takes X-Forwarded-For from loopback clients as the client address, and the
    bridge calls from loopback: the bridge drops such headers, and a relayed join's address
    never admits it anyway."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from parallax.p2p.bridge import _pass

    forwarded = [("X-Forwarded-For", FOREIGN), ("Forwarded", f"for={FOREIGN}"),
                 ("X-Real-IP", FOREIGN), ("X-Join-Token", TOKEN)]
    assert _pass(forwarded) == [("X-Join-Token", TOKEN)]

    async def main():
        state, app = make_scheduler(allow_advertised_hosts=())
        behind_uvicorn = ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1")
        headers = {"X-Join-Token": TOKEN, RELAYED_HEADER: "p2p", "X-Forwarded-For": FOREIGN}
        async with client(behind_uvicorn, "127.0.0.1", headers=headers) as http:
            steer = await http.post("/node/join", json=foreign_join("steer"))
            assert is_error(steer, 403)
            assert "an unknown address" in steer.json()["message"]
        assert state.registry.nodes == {}

    asyncio.run(main())


def test_the_health_probe_reaches_a_p2p_node_by_peer_id_only():
    """A failure names a node: the scheduler asks its /health. A P2P node's advertised URL was
    never checked, so the probe travels by peer id (the P2P transport), never to that URL."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.ConnectError("refused", request=request)

    async def main():
        state = SchedulerState(SchedulerConfig(mdns=False),
                               transport=httpx.MockTransport(handler))
        for node_id, peer_id in (("p2p", "12D3KooWpeer"), ("direct", None)):
            state.join(NodeJoin(node_id, "cpu", "cpu", 2**30, 1.0, 1.0,
                                f"http://10.0.0.9:{3000 + len(node_id)}", "tcp://10.0.0.9:3100",
                                peer_id=peer_id))
            await state.forwarder._probe(node_id)
        await state.forwarder.aclose()
        return state

    state = asyncio.run(main())
    assert [r.headers.get(PEER_HEADER) for r in seen] == ["12D3KooWpeer", None]
    assert [r.url.path for r in seen] == ["/health", "/health"]
    assert state.registry.nodes == {}  # both refused the connection: evicted
