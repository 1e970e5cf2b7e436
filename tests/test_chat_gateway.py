"""`parallax chat` (proxy + web UI) and `parallax gateway` against a fake scheduler."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from fake_scheduler import XSS, FakeScheduler, serving
from processes import free_port

from parallax.chat.server import build_chat_app
from parallax.cli import main as cli_main
from parallax.config import ChatConfig, ConfigError, GatewayConfig
from parallax.gateway.server import build_gateway_app
from parallax.serving.sse import DONE_MARKER, parse_sse_lines

pytestmark = pytest.mark.slow  # servers: the chat proxy and gateway against a fake scheduler

PASSWORD = "correct horse"


def _address(url: str) -> str:
    return url.removeprefix("http://")


@pytest.fixture
def fake() -> Iterator[FakeScheduler]:
    scheduler = FakeScheduler().start()
    yield scheduler
    scheduler.stop()


@pytest.fixture
def keyed_fake() -> Iterator[FakeScheduler]:
    scheduler = FakeScheduler(api_key="sched-key").start()
    yield scheduler
    scheduler.stop()


@pytest.fixture
def chat_url(fake: FakeScheduler) -> Iterator[str]:
    with serving(build_chat_app(ChatConfig(scheduler=_address(fake.url), port=0))) as url:
        yield url


def _gateway(fake: FakeScheduler, api_key: str | None = None):
    config = GatewayConfig(scheduler=_address(fake.url), port=0, password=PASSWORD,
                           api_key=api_key)
    return serving(build_gateway_app(config))


AUTH = {"Authorization": f"Bearer {PASSWORD}"}


def _events(response: httpx.Response) -> list:
    return list(parse_sse_lines(response.iter_lines()))


def _text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


# ---- parallax chat ---------------------------------------------------------------------------


def test_chat_serves_the_web_ui(chat_url: str) -> None:
    index = httpx.get(chat_url + "/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert 'src="static/app.js"' in index.text
    for name, kind in (("app.js", "javascript"), ("markdown.js", "javascript"),
                       ("style.css", "text/css")):
        r = httpx.get(f"{chat_url}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], name


def test_chat_proxies_setup_and_status_endpoints(chat_url: str, fake: FakeScheduler) -> None:
    models = httpx.get(chat_url + "/model/list").json()
    assert models["type"] == "model_list" and models["data"][0]["name"] == "tiny-model"
    command = httpx.get(chat_url + "/node/join/command").json()
    assert command["data"]["command"].startswith("parallax join -s")
    body = {"model_name": "big-model", "init_nodes_num": 2, "is_local_network": False}
    r = httpx.post(chat_url + "/scheduler/init", json=body)
    assert r.status_code == 200 and fake.init_bodies == [body]
    status = httpx.get(chat_url + "/cluster/status_json").json()["data"]
    assert status["model_name"] == "big-model" and status["need_more_nodes"] is True
    with httpx.stream("GET", chat_url + "/cluster/status", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        seen = []
        for event in parse_sse_lines(response.iter_lines()):
            seen.append(event)
            if len(seen) == 2:
                break
    assert all(e["type"] == "cluster_status" for e in seen)


def test_chat_streams_completions_as_they_arrive(chat_url: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    arrivals: list[float] = []
    events = []
    with httpx.stream("POST", chat_url + "/v1/chat/completions", json=body,
                      timeout=10) as response:
        assert response.status_code == 200
        for event in parse_sse_lines(response.iter_lines()):
            arrivals.append(time.monotonic())
            events.append(event)
    assert events[-1] == DONE_MARKER
    assert _text(events) == "Hello **world**, this is a streamed answer."
    assert events[-2]["metrics"]["ttft_ms"] == 12.5
    # ~10 chunks 50 ms apart: the first must not have waited for the last
    assert arrivals[-1] - arrivals[1] > 0.25


def test_chat_forwards_the_authorization_header(keyed_fake: FakeScheduler) -> None:
    app = build_chat_app(ChatConfig(scheduler=_address(keyed_fake.url), port=0))
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with serving(app) as url:
        denied = httpx.post(url + "/v1/chat/completions", json=body)
        assert denied.status_code == 401
        assert denied.json()["object"] == "error" and denied.json()["code"] == 401
        ok = httpx.post(url + "/v1/chat/completions", json=body,
                        headers={"Authorization": "Bearer sched-key"}, timeout=10)
        assert ok.status_code == 200 and "[DONE]" in ok.text
    assert keyed_fake.auth_headers == [None, "Bearer sched-key"]


def test_chat_client_disconnect_closes_upstream(chat_url: str, fake: FakeScheduler) -> None:
    body = {"messages": [{"role": "user", "content": "endless"}], "stream": True}
    with httpx.stream("POST", chat_url + "/v1/chat/completions", json=body,
                      timeout=10) as response:
        received = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                received += 1
            if received >= 4:
                break
    assert fake.endless_closed.wait(5), "the fake scheduler never saw the disconnect"
    assert fake.endless_sent < 100


def test_chat_upstream_down_is_503() -> None:
    app = build_chat_app(ChatConfig(scheduler=f"127.0.0.1:{free_port()}", port=0))
    with serving(app) as url:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/cluster/status"),
                             ("GET", "/model/list")):
            r = httpx.request(method, url + path, json={"messages": []} if method == "POST"
                              else None)
            assert r.status_code == 503, path
            assert r.json()["object"] == "error" and r.json()["code"] == 503
            assert "unreachable" in r.json()["message"]


def test_chat_passes_upstream_errors_through(chat_url: str, fake: FakeScheduler) -> None:
    fake.force_status = 429
    r = httpx.post(chat_url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 429 and r.json()["code"] == 429


# ---- parallax gateway ------------------------------------------------------------------------


def test_gateway_requires_the_password(fake: FakeScheduler) -> None:
    with _gateway(fake) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": PASSWORD},
                        {"Authorization": f"Basic {PASSWORD}"}):
            for method, path in (("POST", "/chat"), ("POST", "/chat/stream"),
                                 ("GET", "/cluster/status"), ("GET", "/nope")):
                r = httpx.request(method, url + path, headers=headers, json={"prompt": "hi"})
                assert r.status_code == 401, (headers, path)
                assert r.json() == {"object": "error", "type": "authentication_error",
                                    "code": 401, "message": r.json()["message"]}
        assert fake.chat_bodies == []


def test_gateway_blocks_a_client_that_guesses_passwords(fake: FakeScheduler) -> None:
    """Issue 11 item 6: 10 wrong passwords within a minute → 429 + Retry-After for that address
    only (another address still gets in), the right password included, until the window ends."""
    now = [5000.0]
    config = GatewayConfig(scheduler=_address(fake.url), port=0, password=PASSWORD)
    guesser = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10)
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.1"), timeout=10)
    with serving(build_gateway_app(config, clock=lambda: now[0])) as url, guesser, other:
        wrong = {"Authorization": "Bearer guess"}
        codes = [guesser.get(url + "/cluster/status", headers=wrong).status_code
                 for _ in range(11)]
        assert codes == [401] * 10 + [429]
        blocked = guesser.get(url + "/cluster/status", headers=AUTH)
        assert blocked.status_code == 429 and blocked.json()["code"] == 429
        assert blocked.headers["Retry-After"] == "60" and "retry in 60 s" in \
            blocked.json()["message"]
        assert other.get(url + "/cluster/status", headers=AUTH).status_code == 200
        now[0] += 59
        assert guesser.get(url + "/cluster/status", headers=AUTH).status_code == 429
        now[0] += 2  # the window has passed
        assert guesser.get(url + "/cluster/status", headers=AUTH).status_code == 200
        assert guesser.get(url + "/cluster/status", headers=wrong).status_code == 401


def test_gateway_chat_assembles_text_and_metrics(fake: FakeScheduler) -> None:
    with _gateway(fake) as url:
        r = httpx.post(url + "/chat", headers=AUTH, timeout=10,
                       json={"prompt": "hi", "max_tokens": 20, "temperature": 0.5})
        assert r.status_code == 200
        body = r.json()
        assert body["response"] == "Hello **world**, this is a streamed answer."
        assert body["metrics"] == {"prompt_tokens": 5, "completion_tokens": 9,
                                   "total_tokens": 14, "ttft_ms": 12.5, "tps": 42.0,
                                   "duration_ms": 250.0}
        sent = fake.chat_bodies[-1]
        assert sent["stream"] is True and sent["max_tokens"] == 20
        assert sent["temperature"] == 0.5
        assert sent["messages"] == [{"role": "user", "content": "hi"}]

        history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hey"},
                   {"role": "user", "content": "think please"}]
        r = httpx.post(url + "/chat", headers=AUTH, json={"messages": history}, timeout=10)
        assert r.status_code == 200
        assert r.json()["reasoning"] == "Let me think about it."
        assert fake.chat_bodies[-1]["messages"] == history

        r = httpx.post(url + "/chat", headers=AUTH, json={"prompt": "xss"}, timeout=10)
        assert XSS in r.json()["response"]

        assert httpx.post(url + "/chat", headers=AUTH, json={}).status_code == 400
        boom = httpx.post(url + "/chat", headers=AUTH, json={"prompt": "boom"}, timeout=10)
        assert boom.status_code == 500 and "pipeline broke" in boom.json()["message"]


def test_gateway_stream_passes_chunks_and_done(fake: FakeScheduler) -> None:
    with _gateway(fake) as url:
        with httpx.stream("POST", url + "/chat/stream", headers=AUTH, json={"prompt": "hi"},
                          timeout=10) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = _events(response)
    assert events[-1] == DONE_MARKER
    assert events[0]["object"] == "chat.completion.chunk"
    assert _text(events) == "Hello **world**, this is a streamed answer."


def test_gateway_stream_disconnect_closes_upstream(fake: FakeScheduler) -> None:
    with _gateway(fake) as url:
        with httpx.stream("POST", url + "/chat/stream", headers=AUTH,
                          json={"prompt": "endless"}, timeout=10) as response:
            for n, _line in enumerate(response.iter_lines()):
                if n > 6:
                    break
        assert fake.endless_closed.wait(5)


def test_gateway_cluster_status_short_form(fake: FakeScheduler) -> None:
    fake.add_node()
    with _gateway(fake) as url:
        r = httpx.get(url + "/cluster/status", headers=AUTH)
    assert r.json() == {"status": "available", "nodes": 1, "model": "tiny-model"}


def test_gateway_uses_its_api_key_upstream(keyed_fake: FakeScheduler) -> None:
    with _gateway(keyed_fake, api_key="sched-key") as url:
        r = httpx.post(url + "/chat", headers=AUTH, json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 200
    assert keyed_fake.auth_headers == ["Bearer sched-key"]  # never the phone's password
    with _gateway(keyed_fake) as url:
        r = httpx.post(url + "/chat", headers=AUTH, json={"prompt": "hi"})
        assert r.status_code == 502 and "API key" in r.json()["message"]


def test_gateway_upstream_down_is_503() -> None:
    config = GatewayConfig(scheduler=f"127.0.0.1:{free_port()}", port=0, password=PASSWORD)
    with serving(build_gateway_app(config)) as url:
        for method, path in (("POST", "/chat"), ("POST", "/chat/stream"),
                             ("GET", "/cluster/status")):
            r = httpx.request(method, url + path, headers=AUTH, json={"prompt": "hi"})
            assert r.status_code == 503 and r.json()["code"] == 503, path


def test_gateway_refuses_to_start_without_password(monkeypatch, capsys) -> None:
    with pytest.raises(ConfigError, match="password"):
        GatewayConfig(password=None)
    with pytest.raises(ConfigError, match="password"):
        GatewayConfig(password="  ")
    monkeypatch.delenv("PARALLAX_GATEWAY_PASSWORD", raising=False)
    assert cli_main(["gateway", "--port", "0"]) == 1
    assert "PARALLAX_GATEWAY_PASSWORD" in capsys.readouterr().err


def test_proxy_configs_validate_the_scheduler_address() -> None:
    assert ChatConfig(scheduler="10.0.0.2:3001").port == 3002
    assert GatewayConfig(password="p").port == 8000
    with pytest.raises(ConfigError, match="HOST:PORT"):
        ChatConfig(scheduler="no-port")
    with pytest.raises(ConfigError, match="port"):
        GatewayConfig(password="p", port=70000)
