"""Lattica peers on loopback: HTTP over the bridge, and the pickle hole closed.

Runs only inside an isolated network namespace (see conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from processes import free_port

from parallax.p2p import safety
from parallax.p2p.bridge import METHOD, HttpBridge, LatticaTransport
from parallax.p2p.peer import PeerConfig, start_peer
from parallax.protocol.p2p import BridgeHead, decode_bridge_frame


class Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def local_app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()

        async def stream():
            try:
                for i in range(body["n"]):
                    yield f"data: {i}\n\n".encode()
                    await asyncio.sleep(body.get("delay", 0))
            finally:
                events.append("closed")

        events.append(f"auth={request.headers.get('authorization')}")
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/secret")
    async def secret():
        return {"secret": 42}

    return app


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """A serving peer (bridge to a local HTTP app) and a calling peer, plus the app's events."""
    events: list[str] = []
    http_port = free_port()
    server = uvicorn.Server(uvicorn.Config(local_app(events), host="127.0.0.1", port=http_port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    keys = tmp_path_factory.mktemp("keys")
    serving_port, calling_port = free_port(), free_port()
    serving = start_peer(PeerConfig(serving_port, "serving", key_root=keys))
    bridge = HttpBridge(serving, f"http://127.0.0.1:{http_port}",
                        ("/v1/chat/completions", "/health"))
    calling = start_peer(PeerConfig(
        calling_port, "calling", key_root=keys,
        bootstraps=(f"/ip4/127.0.0.1/tcp/{serving_port}/p2p/{serving.peer_id()}",)))
    yield serving, calling, events
    bridge.close()
    server.should_exit = True
    thread.join(5)


def client_for(calling, peer_id: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="http://peer", timeout=httpx.Timeout(10, connect=3),
                             transport=LatticaTransport(calling, peer_id))


def test_bridge_streams_and_passes_headers(peers):
    serving, calling, events = peers

    async def main():
        async with client_for(calling, serving.peer_id()) as client:
            health = await client.get("/health")
            arrivals = []
            async with client.stream("POST", "/v1/chat/completions",
                                     json={"n": 4, "delay": 0.2},
                                     headers={"Authorization": "Bearer k"}) as response:
                async for chunk in response.aiter_bytes():
                    arrivals.append((time.monotonic(), chunk))
            return health, response.status_code, arrivals

    health, status, arrivals = asyncio.run(main())
    assert health.status_code == 200 and health.json() == {"ok": True}
    assert status == 200
    assert b"".join(c for _, c in arrivals) == b"".join(b"data: %d\n\n" % i for i in range(4))
    # streamed as produced, not buffered: the chunks arrive spread over the 0.8 s of the answer
    assert arrivals[-1][0] - arrivals[0][0] > 0.4
    assert "auth=Bearer k" in events


def test_bridge_refuses_paths_outside_its_allow_list(peers):
    serving, calling, _ = peers

    async def main():
        async with client_for(calling, serving.peer_id()) as client:
            return await client.get("/secret")

    response = asyncio.run(main())
    assert response.status_code == 404
    assert response.json()["object"] == "error" and "not served over P2P" in response.json()[
        "message"]


def test_closing_the_stream_closes_the_local_request(peers):
    serving, calling, events = peers

    async def main():
        async with client_for(calling, serving.peer_id()) as client:
            async with client.stream("POST", "/v1/chat/completions",
                                     json={"n": 100, "delay": 0.1}) as response:
                async for _ in response.aiter_bytes():
                    break  # the client goes away after the first chunk
        for _ in range(50):
            if events.count("closed") >= 2:
                return
            await asyncio.sleep(0.1)

    before = events.count("closed")
    asyncio.run(main())
    assert events.count("closed") == before + 1  # the 10 s answer was stopped, not run out


def test_unreachable_peer_is_a_connect_error(peers):
    _, calling, _ = peers
    # a valid peer id nobody runs: fails within the timeout instead of hanging
    ghost = "12D3KooWGzh8g2xJvDbCFGXpQ4L7t6P1vMJVsa5xr5fNCGdkzYyq"

    async def main():
        async with client_for(calling, ghost) as client:
            return await client.get("/health")

    started = time.monotonic()
    with pytest.raises(httpx.TransportError):
        asyncio.run(asyncio.wait_for(main(), 60))
    assert time.monotonic() - started < 60


def test_crafted_pickle_from_a_peer_executes_nothing(peers, tmp_path):
    """An attacker speaks raw Lattica to our bridge, our DHT key and Lattica's own stubs."""
    serving, calling, _ = peers
    marker = tmp_path / "pwned"
    crafted = pickle.dumps(Exploit(str(marker)))

    # 1. straight to our bridge method: the bytes are msgpack-decoded, never unpickled
    frames = [decode_bridge_frame(bytes(f))
              for f in calling.get_client(serving.peer_id()).call_stream_iter(METHOD, crafted)]
    assert isinstance(frames[0], BridgeHead) and frames[0].status == 400

    # 2. a crafted value in the DHT, read back through Lattica's own get() (which unpickles)
    for key, value in (("plain", pickle.dumps({"ok": 1})), ("crafted", crafted)):
        calling._lattica_instance.store_with_subkey(key, value, time.time() + 60, None)
    deadline = time.monotonic() + 10
    while serving.get("plain") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert serving.get("plain").value == {"ok": 1}  # the DHT path works...
    assert serving.get("crafted") is None  # ...and the crafted value is refused, not run

    # 3. Lattica's generated handlers and result decoding use the restricted unpickler
    import lattica.connection_handler as ch

    with pytest.raises(RuntimeError, match="refused to unpickle"):
        ch.smart_deserialize(crafted)
    with pytest.raises(pickle.UnpicklingError):
        safety.restricted_loads(crafted)
    assert not marker.exists()
    # plain data still round-trips, so Lattica's own features keep working
    assert safety.restricted_loads(pickle.dumps({"a": [1, 2.0, "x", b"y", None]})) == {
        "a": [1, 2.0, "x", b"y", None]}
    # and the unrestricted unpickler would have run it: the test can fail
    pickle.loads(crafted)
    assert marker.exists()


def test_taken_port_is_a_plain_error(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"tcp port {port}: the port is in use"):
            start_peer(PeerConfig(port, "taken", key_root=tmp_path))
