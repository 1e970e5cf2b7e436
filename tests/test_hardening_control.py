"""Issue 11, secrets and control: every attack of items 1-5 and 12 (scheduler and proxies side).

In-process first (the real apps through httpx's ASGI transport, with the client address an
attacker would have), then against real processes: a `parallax run --api-key --join-token` and
a `parallax chat` in a network namespace of their own, attacked from this namespace over a veth
pair (from outside loopback) and through the chat server (which reaches the scheduler over
loopback). The P2P bridge's part runs in tests/p2p/test_p2p_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from conftest import require
from fake_scheduler import serving
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from processes import die_with_pytest, free_port
from test_scheduler_app import MB, OTHER, SPEC, ServerThread

from parallax import cli
from parallax.chat.server import build_chat_app
from parallax.config import ChatConfig, ConfigError, GatewayConfig, SchedulerConfig, ServeConfig
from parallax.gateway.server import build_gateway_app
from parallax.net import is_loopback_host
from parallax.node.http_server import build_app as build_node_app
from parallax.scheduler.app import SchedulerState, build_app
from parallax.scheduler.catalog import ModelCatalog
from parallax.scheduler.status import with_join_token
from parallax.serving.security import RELAYED_HEADER, is_host_port_url

TOKEN = "j0in-T0KEN-never-shown"
KEY = "operator-key-123"
OUTSIDE = "10.9.8.7"  # a client address on the network, not this machine
RELAYED = {RELAYED_HEADER: "chat"}


# ---- helpers ----------------------------------------------------------------------------------


class Head:
    """A fake head node (ASGI, the forwarder's transport): `HOLD` waits for `release`; the
    response kind is set by `mode` (json | html | text500)."""

    def __init__(self) -> None:
        self.rids: list[str] = []
        self.release = asyncio.Event()
        self.mode = "json"
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.rids.append(body["rid"])
        if body["messages"][-1]["content"] == "HOLD":
            await asyncio.wait_for(self.release.wait(), 10)
        if self.mode == "html":
            return Response("<script>alert(1)</script>", media_type="text/html")
        if self.mode == "text500":
            return Response("Traceback: secret internals", status_code=500,
                            media_type="text/plain")
        return JSONResponse({"id": body["rid"], "object": "chat.completion", "choices": []})


def make_scheduler(head: Head | None = None, **overrides: Any) -> tuple[SchedulerState, FastAPI]:
    settings = {"mdns": False, "retry_attempts": 2, "retry_interval_s": 0.05,
                "join_token": TOKEN, "allow_advertised_hosts": ("head.test",), **overrides}
    catalog = ModelCatalog(known={"test-model": SPEC, "other-model": OTHER}, curated={},
                           include_builtin=False)
    transport = httpx.ASGITransport(app=head.app) if head is not None else None
    state = SchedulerState(SchedulerConfig(**settings), catalog=catalog, transport=transport)
    state.set_model("test-model", 1)
    return state, build_app(state)


def client(app: FastAPI, peer: str = "127.0.0.1", host: str = "127.0.0.1:3001",
           **kwargs: Any) -> httpx.AsyncClient:
    """A client of `app` connecting from `peer`, asking for `host`."""
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url=f"http://{host}", timeout=10,
                             **kwargs)


def join_body(node_id: str, **fields: Any) -> dict[str, Any]:
    return {"node_id": node_id, "device": "cpu", "device_name": "cpu", "memory_bytes": 200 * MB,
            "gflops": 1.0, "bandwidth_gbps": 1.0, "http_url": "http://head.test:3000",
            "activation_endpoint": "tcp://head.test:3100", "max_running_requests": 1,
            **fields}


async def bring_up(http: httpx.AsyncClient, node_id: str = "a") -> str:
    """Join `node_id` (holding the whole model) and report it loaded; returns its secret."""
    joined = (await http.post("/node/join", json=join_body(node_id))).json()
    secret, layers = joined["node_secret"], joined["assignment"]
    beat = {"node_id": node_id, "state": "ready", "loaded_model": layers["model"],
            "loaded_start_layer": layers["start_layer"], "loaded_end_layer": layers["end_layer"]}
    answer = await http.post("/node/heartbeat", json=beat, headers={"X-Node-Secret": secret})
    assert answer.status_code == 200, answer.text
    return secret


async def chunked(size: int, piece: int = 4096) -> AsyncIterator[bytes]:
    """A body of `size` bytes sent without Content-Length (chunked)."""
    sent = 0
    while sent < size:
        yield b" " * min(piece, size - sent)
        sent += piece


def chunked_sync(size: int, piece: int = 65536) -> Iterator[bytes]:
    """:func:`chunked` for a blocking client."""
    sent = 0
    while sent < size:
        yield b" " * min(piece, size - sent)
        sent += piece


def run(coro) -> Any:
    return asyncio.run(coro)


def is_error(response: httpx.Response, status: int) -> bool:
    body = response.json()
    return response.status_code == status and body["object"] == "error" and body["code"] == status


# ---- 1. the join token is shown to the operator only ------------------------------------------


def test_join_command_and_status_hide_the_token_from_non_operators():
    async def main():
        _, open_app = make_scheduler()  # no API key: the operator is a direct loopback client
        _, keyed_app = make_scheduler(api_key=KEY)
        cases = [(open_app, "127.0.0.1", {}, True), (open_app, "::1", {}, True),
                 (open_app, OUTSIDE, {}, False), (open_app, "127.0.0.1", RELAYED, False),
                 (keyed_app, "127.0.0.1", {}, False),
                 (keyed_app, OUTSIDE, {"Authorization": "Bearer wrong"}, False),
                 (keyed_app, OUTSIDE, {"Authorization": f"Bearer {KEY}"}, True)]
        for app, peer, headers, operator in cases:
            async with client(app, peer, headers=headers) as http:
                command = (await http.get("/node/join/command")).json()["data"]["command"]
                status = await http.get("/cluster/status_json")
            expected = f"--join-token {TOKEN}" if operator else "--join-token <token>"
            assert command.endswith(expected), (peer, headers, command)
            assert status.status_code == 200  # public, but the token only for the operator
            assert (TOKEN in status.text) is operator, (peer, headers)

    run(main())


def test_status_stream_hides_the_token_without_the_key():
    state, app = make_scheduler(api_key=KEY)
    server = ServerThread(app)
    try:
        for headers, shown in (({}, False), ({"Authorization": f"Bearer {KEY}"}, True)):
            with httpx.stream("GET", f"{server.url}/cluster/status", headers=headers,
                              timeout=10) as response:
                first = next(line for line in response.iter_lines() if line.startswith("data:"))
            assert "--join-token" in first and (TOKEN in first) is shown
    finally:
        server.stop()


def test_join_command_quotes_the_token():
    command = with_join_token("parallax join -s h:1", "a b'c;rm -rf /", reveal=True)
    assert shlex.split(command)[-2:] == ["--join-token", "a b'c;rm -rf /"]
    assert with_join_token("parallax join -s h:1", None, reveal=True) == "parallax join -s h:1"


# ---- 2. /scheduler/init needs the operator ------------------------------------------------------


def test_scheduler_init_refuses_anyone_but_the_operator():
    takeover = {"model_name": "other-model", "init_nodes_num": 10000}
    switch = {"model_name": "other-model", "init_nodes_num": 2}

    async def main():
        state, app = make_scheduler()
        for peer, headers, status in ((OUTSIDE, {}, 403), ("127.0.0.1", RELAYED, 403)):
            async with client(app, peer, headers=headers) as http:
                assert is_error(await http.post("/scheduler/init", json=switch), status)
        assert state.model_name == "test-model" and state.registry.init_nodes_num == 1
        async with client(app) as http:  # the setup page on the scheduler's machine
            # a cross-site form post is text/plain: refused before anything is read
            plain = await http.post("/scheduler/init", content=json.dumps(switch),
                                    headers={"Content-Type": "text/plain"})
            assert is_error(plain, 415) and state.model_name == "test-model"
            assert is_error(await http.post("/scheduler/init", json=takeover), 400)
            assert is_error(await http.post("/scheduler/init", json={"init_nodes_num": 0}), 400)
            ok = await http.post("/scheduler/init", json=switch)
            assert ok.status_code == 200 and state.model_name == "other-model"

        state, app = make_scheduler(api_key=KEY)
        for peer, headers in (("127.0.0.1", {}), (OUTSIDE, {"Authorization": "Bearer nope"}),
                              ("127.0.0.1", {"Authorization": KEY})):
            async with client(app, peer, headers=headers) as http:
                assert is_error(await http.post("/scheduler/init", json=switch), 401)
        assert state.model_name == "test-model"
        async with client(app, OUTSIDE, headers={"Authorization": f"Bearer {KEY}"}) as http:
            assert (await http.post("/scheduler/init", json=switch)).status_code == 200
        assert state.model_name == "other-model" and state.registry.init_nodes_num == 2

    run(main())


def test_chat_proxy_on_the_scheduler_machine_is_not_its_operator():
    """`parallax chat` reaches the scheduler over real loopback TCP: relayed, so not loopback."""
    state, app = make_scheduler()  # no API key
    scheduler = ServerThread(app)
    chat_app = build_chat_app(ChatConfig(scheduler=f"127.0.0.1:{scheduler.port}", port=0))
    try:
        with serving(chat_app) as chat:
            forged = {RELAYED_HEADER: "", "Authorization": "Bearer whatever"}
            init = httpx.post(f"{chat}/scheduler/init", headers=forged,
                              json={"model_name": "other-model"})
            assert is_error(init, 403) and state.model_name == "test-model"
            for path in ("/node/join/command", "/cluster/status_json"):
                answer = httpx.get(chat + path)
                assert answer.status_code == 200 and TOKEN not in answer.text
                assert "--join-token <token>" in answer.text
        # the same request straight to the scheduler from this machine is the operator's
        direct = httpx.get(f"{scheduler.url}/node/join/command").json()["data"]["command"]
        assert direct.endswith(f"--join-token {TOKEN}")
    finally:
        scheduler.stop()


# ---- 3. Host header and framing -----------------------------------------------------------------


def _assert_security_headers(response: httpx.Response) -> None:
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_host_header_check_and_security_headers_on_every_server():
    node_app = build_node_app(SimpleNamespace(config=ServeConfig(model="fake")))
    chat_app = build_chat_app(ChatConfig(scheduler="127.0.0.1:9", port=0))
    gateway_app = build_gateway_app(GatewayConfig(scheduler="127.0.0.1:9", password="pw"))
    _, scheduler_app = make_scheduler()
    _, open_app = make_scheduler(host="0.0.0.0")
    _, listed_app = make_scheduler(host="0.0.0.0", allowed_hosts=("sched.lan",))

    async def status_for(app: FastAPI, host: str, path: str = "/") -> httpx.Response:
        async with client(app, host=host) as http:
            return await http.get(path, headers={"Authorization": "Bearer pw"})

    async def main():
        for app in (scheduler_app, node_app, chat_app, gateway_app):  # all bound to loopback
            rebound = await status_for(app, "evil.example:3001")
            assert is_error(rebound, 400) and "127.0.0.1" in rebound.json()["message"]
            _assert_security_headers(rebound)
            for host in ("127.0.0.1:3001", "localhost:3001", "[::1]:3001", "127.0.0.2"):
                answer = await status_for(app, host, "/nowhere")
                assert answer.status_code in (401, 404), (host, answer.text)
                _assert_security_headers(answer)
        page = await status_for(scheduler_app, "localhost:3001")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        _assert_security_headers(page)
        assert (await status_for(open_app, "evil.example")).status_code == 200  # default: any
        assert is_error(await status_for(listed_app, "evil.example"), 400)
        for host in ("sched.lan:3001", "SCHED.LAN", "127.0.0.1:3001"):
            assert (await status_for(listed_app, host)).status_code == 200, host

    run(main())


def test_loopback_and_address_helpers():
    assert all(is_loopback_host(h) for h in ("localhost", "127.0.0.1", "127.8.9.1", "::1",
                                             "[::1]", "::ffff:127.0.0.1"))
    assert not any(is_loopback_host(h) for h in ("10.0.0.1", "evil.localhost.example", "",
                                                 None, "0.0.0.0", "::"))
    good = ("http://h:1", "https://10.0.0.1:443/", "http://[::1]:3000")
    assert all(is_host_port_url(u, ("http", "https")) for u in good)
    bad = ("http://h:1/x", "http://h:1?x=1", "http://u:p@h:1", "http://h", "ftp://h:1",
           "http://h:0", "http://h:99999", "http://h:1#f", "http://h h:1", "http://h:1/?")
    assert not any(is_host_port_url(u, ("http", "https")) for u in bad)


# ---- 4. node identities and what a head may send back ----------------------------------------


def test_a_token_holder_cannot_speak_for_another_node():
    async def main():
        state, app = make_scheduler()
        async with client(app, OUTSIDE, headers={"X-Join-Token": TOKEN}) as http:
            victim = (await http.post("/node/join", json=join_body("victim"))).json()
            secret = victim["node_secret"]
            assert len(secret) >= 32
            mallory = (await http.post("/node/join", json=join_body("mallory"))).json()
            beat = {"node_id": "victim", "state": "idle"}
            for headers in ({}, {"X-Node-Secret": mallory["node_secret"]}):
                assert is_error(await http.post("/node/heartbeat", json=beat, headers=headers),
                                403)
                assert is_error(await http.post("/node/leave", json={"node_id": "victim"},
                                                headers=headers), 403)
                # taking over the id by joining again: refused while the victim is alive
                hijack = await http.post("/node/join", headers=headers, json=join_body(
                    "victim", http_url="http://mallory.test:80"))
                assert is_error(hijack, 409)
            assert state.registry.nodes["victim"].http_url == "http://head.test:3000"
            mine = await http.post("/node/heartbeat", json=beat, headers={"X-Node-Secret": secret})
            assert mine.status_code == 200 and mine.json()["known"] is True
            # the victim restarts and lost its secret: it is let in once its entry is evicted
            state.clock = lambda: time.monotonic() + 3600
            state.evict_silent()
            again = await http.post("/node/join", json=join_body("victim"))
            assert again.status_code == 200 and again.json()["node_secret"] != secret
            stale = await http.post("/node/heartbeat", json=beat, headers={"X-Node-Secret": secret})
            assert is_error(stale, 403)
            left = await http.post("/node/leave", json={"node_id": "victim"},
                                   headers={"X-Node-Secret": again.json()["node_secret"]})
            assert left.json() == {"ok": True, "known": True}

    run(main())


def test_join_addresses_must_be_plain_host_and_port():
    async def main():
        state, app = make_scheduler()
        async with client(app, headers={"X-Join-Token": TOKEN}) as http:
            for fields in ({"http_url": "http://h:1/steer?x="}, {"http_url": "http://u:p@h:1"},
                           {"http_url": "http://h"}, {"http_url": "file://h:1"},
                           {"activation_endpoint": "ipc:///tmp/x"},
                           {"activation_endpoint": "tcp://h:1/x"},
                           {"activation_endpoint": "http://h:1"}, {"node_id": "a b"},
                           {"node_id": "x" * 200}):
                answer = await http.post("/node/join", json={**join_body("n"), **fields})
                assert is_error(answer, 400), fields
        assert state.registry.nodes == {}

    run(main())


def test_a_head_cannot_make_the_scheduler_serve_its_body_or_pick_the_rid():
    async def main():
        head = Head()
        _, app = make_scheduler(head)
        async with client(app, headers={"X-Join-Token": TOKEN}) as http:
            await bring_up(http)
            chat = {"messages": [{"role": "user", "content": "hi"}], "rid": "someone-elses"}
            assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
            assert head.rids[-1].startswith("chatcmpl-")  # the client's rid is ignored
            head.mode = "html"
            for stream in (False, True):
                answer = await http.post("/v1/chat/completions", json={**chat, "stream": stream})
                assert is_error(answer, 502) and "<script>" not in answer.text
                assert answer.headers["content-type"] == "application/json"
            head.mode = "text500"
            answer = await http.post("/v1/chat/completions", json=chat)
            assert is_error(answer, 500) and "internals" not in answer.text

    run(main())


# ---- 5. secrets off the command line ------------------------------------------------------------


def test_secrets_come_from_flags_files_or_the_environment(tmp_path, monkeypatch):
    parser = cli.build_parser()
    secret_file = tmp_path / "token"
    secret_file.write_text("from-file\n")
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("PARALLAX_JOIN_TOKEN", "from-env")

    def token(*argv: str) -> str | None:
        return cli._secret(parser.parse_args(["run", *argv]), "--join-token",
                           "PARALLAX_JOIN_TOKEN")

    assert token() == "from-env"
    assert token("--join-token-file", str(secret_file)) == "from-file"
    assert token("--join-token", "from-flag") == "from-flag"
    for argv in (("--join-token", "x", "--join-token-file", str(secret_file)),
                 ("--join-token-file", str(tmp_path / "empty")),
                 ("--join-token-file", str(tmp_path / "missing"))):
        with pytest.raises(ConfigError):
            token(*argv)
    monkeypatch.delenv("PARALLAX_JOIN_TOKEN")
    assert token() is None
    for command, flag, env in (("join", "--join-token", "PARALLAX_JOIN_TOKEN"),
                               ("gateway", "--password", "PARALLAX_GATEWAY_PASSWORD"),
                               ("gateway", "--api-key", "PARALLAX_API_KEY"),
                               ("run", "--api-key", "PARALLAX_API_KEY")):
        args = parser.parse_args([command, f"{flag}-file", str(secret_file)])
        assert cli._secret(args, flag, env) == "from-file"
    hosts = parser.parse_args(["run", "--allowed-hosts", "a.lan,b.lan", "--allowed-hosts", "c"])
    assert cli._hosts(hosts.allowed_hosts) == ("a.lan", "b.lan", "c")


# ---- 12. body limits and the wait queue ---------------------------------------------------------


def test_chunked_bodies_are_capped_while_streaming():
    gateway_app = build_gateway_app(GatewayConfig(scheduler="127.0.0.1:9", password="pw",
                                                  max_body_bytes=2048))
    chat_app = build_chat_app(ChatConfig(scheduler="127.0.0.1:9", port=0, max_body_bytes=2048))

    async def main():
        _, app = make_scheduler(max_body_bytes=2048)
        async with client(app, headers={"X-Join-Token": TOKEN}) as http:
            for path, size in (("/v1/chat/completions", 4096), ("/scheduler/init", 70_000),
                               ("/node/join", 70_000), ("/node/heartbeat", 70_000),
                               ("/node/leave", 70_000)):
                answer = await http.post(path, content=chunked(size),
                                         headers={"Content-Type": "application/json"})
                assert "content-length" not in answer.request.headers
                assert is_error(answer, 413), path
        # the proxies stop before the scheduler is even asked (it is unreachable: 503 else)
        for proxy, path in ((chat_app, "/v1/chat/completions"), (gateway_app, "/chat")):
            async with client(proxy, headers={"Authorization": "Bearer pw"}) as http:
                assert is_error(await http.post(path, content=chunked(4096)), 413), path

    run(main())


def test_the_wait_queue_is_bounded():
    async def main():
        head = Head()
        state, app = make_scheduler(head, max_queued=1, retry_attempts=200,
                                    retry_interval_s=0.05)
        async with client(app, headers={"X-Join-Token": TOKEN}) as http:
            await bring_up(http)

            def ask(text: str):
                return asyncio.create_task(http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": text}]}))

            running = ask("HOLD")
            while not head.rids:
                await asyncio.sleep(0.01)
            waiting = ask("hi")
            while state.forwarder.queued < 1:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            refused = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "one too many"}]})
            assert is_error(refused, 429) and time.monotonic() - started < 2
            assert "wait" in refused.json()["message"]
            head.release.set()
            assert (await running).status_code == 200 and (await waiting).status_code == 200

    run(main())


# ---- the same attacks against real processes, from outside loopback and through chat ----------

SUBNET = "10.79.3"  # the scheduler's namespace is .1, this one .2


def _sh(command: str) -> None:
    subprocess.run(["sh", "-c", command], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def scheduler_namespace() -> Iterator[str]:
    """A namespace of its own for the scheduler's machine, linked to this one by a veth pair."""
    name, tag = f"pxh-{os.getpid() % 10000}", os.getpid() % 10000
    try:
        _sh(f"mkdir -p /run/netns && ip netns add {name}")
        _sh(f"ip link add vh{tag} type veth peer name vs{tag} && ip link set vs{tag} netns {name}")
        _sh(f"ip addr add {SUBNET}.2/24 dev vh{tag} && ip link set vh{tag} up")
        _sh(f"ip netns exec {name} sh -c 'ip link set lo up && ip addr add {SUBNET}.1/24 dev "
            f"vs{tag} && ip link set vs{tag} up'")
    except (subprocess.CalledProcessError, OSError) as exc:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        require(False, f"cannot build a veth-linked network namespace here (needs root): {exc}")
    yield name
    subprocess.run(["ip", "link", "del", f"vh{tag}"], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _wait_up(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} never came up"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def remote(scheduler_namespace, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """`parallax run` (API key from a file, join token from the environment: neither on its
    command line) and `parallax chat` on the scheduler's machine, both on every interface of
    that namespace; the chat server reaches the scheduler over loopback."""
    tmp = tmp_path_factory.mktemp("remote")
    (tmp / "key").write_text(KEY + "\n")
    env = {**os.environ, "TMPDIR": str(tmp), "PARALLAX_JOIN_TOKEN": TOKEN}
    env.pop("PARALLAX_API_KEY", None)
    port, chat_port = free_port(), free_port()
    spawned = []

    def spawn(name: str, args: list[str]) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "ab")
        spawned.append(subprocess.Popen(
            ["ip", "netns", "exec", scheduler_namespace, sys.executable, "-m", "parallax.cli",
             *args], stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_pytest))
        return spawned[-1]

    try:
        scheduler = spawn("scheduler", ["run", "--host", "0.0.0.0", "--port", str(port),
                                        "--no-mdns", "--api-key-file", str(tmp / "key"),
                                        "--retry-attempts", "0",
                                        "--allow-advertised-hosts", "head.test"])
        chat = spawn("chat", ["chat", "-s", f"127.0.0.1:{port}", "--host", "0.0.0.0",
                              "--port", str(chat_port)])
        url, chat_url = f"http://{SUBNET}.1:{port}", f"http://{SUBNET}.1:{chat_port}"
        _wait_up(url + "/cluster/status_json", scheduler, "the scheduler")
        _wait_up(chat_url + "/", chat, "the chat server")
        yield SimpleNamespace(url=url, chat_url=chat_url, port=port, tmp=tmp,
                              namespace=scheduler_namespace, pids=[p.pid for p in spawned])
    finally:
        for proc in spawned:
            proc.terminate()
        for proc in spawned:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
def test_attacks_from_outside_loopback_and_through_chat(remote):
    seen: list[httpx.Response] = []

    def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = httpx.request(method, url, timeout=10, **kwargs)
        seen.append(response)
        return response

    operator = {"Authorization": f"Bearer {KEY}"}
    takeover = {"model_name": "SmolLM2-135M-Instruct", "init_nodes_num": 10000}
    for base in (remote.url, remote.chat_url):  # straight, and through parallax chat
        for path in ("/node/join/command", "/cluster/status_json"):
            assert call("GET", base + path).status_code == 200
        with httpx.stream("GET", base + "/cluster/status", timeout=10) as stream:
            first = next(line for line in stream.iter_lines() if line.startswith("data:"))
        assert "--join-token <token>" in first and TOKEN not in first
        assert is_error(call("POST", base + "/scheduler/init", json=takeover), 401)
        assert is_error(call("POST", base + "/scheduler/init", content=json.dumps(takeover),
                             headers={**operator, "Content-Type": "text/plain"}), 415)
        assert is_error(call("POST", base + "/scheduler/init", json=takeover,
                             headers=operator), 400)
        big = call("POST", base + "/v1/chat/completions", headers=operator,
                   content=chunked_sync(5 * 2**20))
        assert is_error(big, 413)
    assert is_error(call("POST", remote.url + "/node/join", content=chunked_sync(100_000),
                         headers={"X-Join-Token": TOKEN}), 413)
    # DNS rebinding shape: a foreign Host is answered only where no list is set (0.0.0.0 here)
    assert call("GET", remote.url + "/", headers={"Host": "evil.example"}).status_code == 200
    # one token holder cannot heartbeat for, evict or replace another node
    token = {"X-Join-Token": TOKEN}
    victim = call("POST", remote.url + "/node/join", headers=token, json=join_body("victim"))
    assert victim.status_code == 200
    beat = {"node_id": "victim", "state": "idle"}
    assert is_error(call("POST", remote.url + "/node/heartbeat", headers=token, json=beat), 403)
    assert is_error(call("POST", remote.url + "/node/leave", headers=token,
                         json={"node_id": "victim"}), 403)
    assert is_error(call("POST", remote.url + "/node/join", headers=token,
                         json=join_body("victim")), 409)
    # nor point the cluster at a host other than its own (the scheduler sees it at SUBNET.2)
    for url, endpoint in (("http://10.250.0.9:22", f"tcp://{SUBNET}.2:3100"),
                          (f"http://{SUBNET}.2:3000", f"tcp://{SUBNET}.1:22")):
        steer = call("POST", remote.url + "/node/join", headers=token,
                     json=join_body("steer", http_url=url, activation_endpoint=endpoint))
        assert is_error(steer, 403) and "--allow-advertised-hosts" in steer.json()["message"]
    status = call("GET", remote.url + "/cluster/status_json").json()["data"]
    assert status["model_name"] is None and status["init_nodes_num"] == 1
    assert [n["node_id"] for n in status["node_list"]] == ["victim"]
    own = call("POST", remote.url + "/node/join", headers=token, json=join_body(
        "own", http_url=f"http://{SUBNET}.2:3000", activation_endpoint=f"tcp://{SUBNET}.2:3100"))
    assert own.status_code == 200, own.text
    assert all(TOKEN not in r.text for r in seen), [r.url for r in seen if TOKEN in r.text]
    # the operator sees the real command: with the key from anywhere, or on the machine itself
    real = call("GET", remote.chat_url + "/node/join/command", headers=operator)
    assert real.json()["data"]["command"].endswith(f"--join-token {TOKEN}")
    # secrets stayed off the command lines, and the console shows the real command once
    for pid in remote.pids:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read()
        assert TOKEN.encode() not in argv and KEY.encode() not in argv
    log = (remote.tmp / "scheduler.log").read_text()
    assert log.count(f"--join-token {TOKEN}") == 1
