"""`parallax serve` end to end on the built-in model: one server process for the whole module.

The server runs as a subprocess (`python -m parallax.cli serve`) on a free port; every test talks
HTTP to it (the official `openai` client, raw httpx for SSE and errors). The executor-kill test
runs last because it makes the server reload the model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from processes import die_with_pytest, free_port

from parallax.models.hub import DEFAULT_MODEL, builtin_gguf_path
from parallax.models.loader import load_tokenizer
from parallax.serving.sse import parse_sse_lines

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 180
LONG = 300  # max_tokens of requests that must still be running when the test interrupts them
# a disconnected request must be freed within FREED_S, while left alone it would decode
# DISCONNECTED_MAX_TOKENS tokens (tens of seconds): the window proves the disconnect freed it,
# with headroom for a loaded 2-core CI machine
FREED_S = 5.0
DISCONNECTED_MAX_TOKENS = 2000
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three primary colors.", "Explain recursion in one sentence."]






def wait_health(url: str, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory):
    """A running `parallax serve` (built-in model); yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "wb")
    cmd = [sys.executable, "-m", "parallax.cli", "serve", "--port", str(port),
           "--max-batch-size", "16", "--max-waiting", "4", "--kv-memory", "256MB",
           "--max-body-mb", "0.25"]
    # TMPDIR: the ipc sockets' private dir lands under pytest's tmp dir, even after a SIGKILL
    env = {**os.environ, "TMPDIR": str(log_path.parent)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=die_with_pytest)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, START_TIMEOUT_S, proc)
        yield url
    except Exception:
        print(open(log_path).read()[-5000:])
        raise
    finally:
        executor_pid = _executor_pid(url)
        proc.kill()  # no clean shutdown: the executor must die with its frontend anyway
        proc.wait(10)
        log.close()
        output = open(log_path).read()
        assert f"Parallax node serving {DEFAULT_MODEL} on http://127.0.0.1:{port}" in output
        if executor_pid is not None:
            deadline = time.monotonic() + 10
            while _alive(executor_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(executor_pid), "the executor outlived its frontend"


def _executor_pid(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=5).json()["executor_pid"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(builtin_gguf_path())


@pytest.fixture
def oai(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", timeout=60, max_retries=0)


def greedy_stream(url: str, content: str, max_tokens: int) -> tuple[str, str]:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        events = list(parse_sse_lines(r.iter_lines()))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    return text, events[-2]["choices"][0]["finish_reason"]


def test_openai_client_non_streaming_answers_paris(oai):
    r = oai.chat.completions.create(model="default", messages=FRANCE, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    metrics = r.model_extra["metrics"]
    assert metrics["ttft_ms"] > 0 and metrics["tps"] > 0 and metrics["duration_ms"] > 0


def test_openai_client_streaming_equals_non_streaming(oai):
    full = oai.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, temperature=0,
                                       max_tokens=12)
    chunks = list(oai.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE,
                                              temperature=0, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_max_tokens_and_usage_match_the_tokenizer(oai, tokenizer):
    r = oai.chat.completions.create(model="default", messages=FRANCE, temperature=0,
                                    max_tokens=4)
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4
    assert len(tokenizer.encode(r.choices[0].message.content, add_special_tokens=False)) == 4
    assert r.usage.total_tokens == r.usage.prompt_tokens + 4
    # a natural stop counts the end-of-turn token too (it was generated)
    r = oai.chat.completions.create(model="default", messages=FRANCE, temperature=0)
    content_tokens = len(tokenizer.encode(r.choices[0].message.content, add_special_tokens=False))
    assert r.usage.completion_tokens == content_tokens + 1


def test_stop_strings_cut_the_output_even_across_tokens(oai):
    plain = oai.chat.completions.create(model="default", messages=FRANCE, temperature=0)
    text = plain.choices[0].message.content
    assert "of France" in text
    for stream in (False, True):
        kwargs = dict(model="default", messages=FRANCE, temperature=0, stop=["f Fra"])
        if stream:
            out = "".join(c.choices[0].delta.content or "" for c in
                          oai.chat.completions.create(stream=True, **kwargs))
        else:
            out = oai.chat.completions.create(**kwargs).choices[0].message.content
        assert out == text[: text.index("f Fra")]


def test_seed_makes_sampling_reproducible(oai):
    kwargs = dict(model="default", messages=[{"role": "user", "content": "Tell me a story."}],
                  temperature=1.0, top_p=0.95, max_tokens=16)
    a = oai.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = oai.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    assert a == b
    others = {oai.chat.completions.create(seed=s, **kwargs).choices[0].message.content
              for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # the seed does steer sampling


def test_raw_sse_chunk_sequence(serve_url):
    body = {"messages": FRANCE, "temperature": 0, "max_tokens": 6, "stream": True,
            "rid": "raw-sse-1"}
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    assert all(b.startswith("data: {") for b in blocks[:-2])
    events = list(parse_sse_lines(raw.splitlines()))
    chunks = events[:-1]
    assert len(chunks) >= 3
    first, last = chunks[0], chunks[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks:
        assert c["id"] == "raw-sse-1" and c["object"] == "chat.completion.chunk"
        assert c["model"] == DEFAULT_MODEL and isinstance(c["created"], int)
        assert set(c["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 6
    assert set(last["metrics"]) == {"ttft_ms", "tps", "duration_ms", "stages", "slowest_stage"}
    [stage] = last["metrics"]["stages"]  # the whole model on one node: one stage, no hops
    assert stage["layers"] == [0, 30] and stage["steps"] >= 6 and stage["compute_ms"] > 0
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def _wait_idle(url: str, within: float) -> dict:
    deadline = time.monotonic() + within
    while True:
        h = _health(url)
        if h["num_running"] == 0 and h["num_waiting"] == 0 and \
                h["num_free_blocks"] == h["num_total_blocks"]:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle {within} s after the disconnect: {h}")
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_everything_long_before_the_answer_would_end(serve_url):
    body = {"messages": FRANCE, "max_tokens": DISCONNECTED_MAX_TOKENS, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 4:
                break
        assert _health(serve_url)["num_running"] == 1
    _wait_idle(serve_url, FREED_S)


def test_disconnect_while_waiting_for_a_non_streaming_answer(serve_url):
    body = {"messages": FRANCE, "max_tokens": DISCONNECTED_MAX_TOKENS, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=1.5)
    _wait_idle(serve_url, FREED_S)


def test_16_concurrent_streams_equal_single_client_greedy(serve_url):
    max_tokens = 16
    single = {p: greedy_stream(serve_url, p, max_tokens) for p in PROMPTS}

    async def one(client: httpx.AsyncClient, content: str) -> tuple[str, str]:
        body = {"messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": max_tokens, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines()]
        events = list(parse_sse_lines(lines))
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        return text, events[-2]["choices"][0]["finish_reason"]

    async def all_of_them():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=serve_url, timeout=120, limits=limits) as client:
            prompts = PROMPTS * 4
            results = await asyncio.wait_for(
                asyncio.gather(*(one(client, p) for p in prompts)), 150)
        return list(zip(prompts, results, strict=True))

    for prompt, result in asyncio.run(all_of_them()):
        assert result == single[prompt], prompt


BAD_INPUTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[]", 400, "JSON object"),
    (b'{"stream": true}', 400, "'messages' is required"),
    (b'{"messages": []}', 400, "at least one message"),
    (b'{"messages": "hi"}', 400, "must be an array"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}', 400, "integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400,
     "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', 400, "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}', 400, "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "boolean"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}', 404, "gpt-4"),
    (b'{"messages": [{"role": "user", "content": "' + b"hello " * 9000 + b'"}]}', 400,
     "context"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * 300_000 + b'"}]}', 413, "limit"),
    # a caller-written template (here a loop of 9**9 rounds) must never reach Jinja
    (b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": '
     b'{"chat_template": "{% for i in range(9**9) %}x{% endfor %}"}}', 400, "enable_thinking"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["' + b"s" * 300 + b'"]}', 400,
     "at most 256 characters"),
]


@pytest.mark.parametrize("raw,status,needle", BAD_INPUTS,
                         ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_its_status_and_error_body(serve_url, raw, status, needle):
    r = httpx.post(f"{serve_url}/v1/chat/completions", content=raw, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"object", "message", "type", "code"}
    assert body["object"] == "error" and body["code"] == status
    assert needle in body["message"]
    assert _health(serve_url)["status"] == "ready"


def test_duplicate_running_rid_is_400_and_server_still_answers(serve_url, oai):
    body = {"messages": FRANCE, "max_tokens": LONG, "ignore_eos": True, "stream": True,
            "rid": "dup-1"}
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
        next(lines)
        again = {"messages": FRANCE, "max_tokens": 1, "rid": "dup-1"}
        second = httpx.post(f"{serve_url}/v1/chat/completions", json=again, timeout=30)
        assert second.status_code == 400 and "dup-1" in second.json()["message"]
    _wait_idle(serve_url, 1.0)
    r = oai.chat.completions.create(model="default", messages=FRANCE, temperature=0)
    assert "Paris" in r.choices[0].message.content


def test_models_health_and_metrics_endpoints(serve_url, oai):
    assert [m.id for m in oai.models.list().data] == [DEFAULT_MODEL]
    health = _health(serve_url)
    assert health["status"] == "ready" and health["num_total_blocks"] > 0
    assert isinstance(health["executor_pid"], int)
    text = httpx.get(f"{serve_url}/metrics", timeout=5).text
    assert 'parallax_requests_total{finish_reason="stop",status="200"}' in text
    assert 'parallax_requests_total{finish_reason="none",status="400"}' in text
    assert "parallax_time_to_first_token_seconds_bucket" in text
    assert "parallax_tokens_per_second_bucket" in text


DEGENERATE = [  # sampling settings that once turned logits into NaN / inf
    {"temperature": 1e-45},
    {"temperature": 1e-45, "top_p": 1e-9, "min_p": 1.0},
    {"temperature": 1e-5, "top_p": 1e-9, "min_p": 1.0, "top_k": 1,
     "frequency_penalty": 2, "presence_penalty": 2},
    {"temperature": 1e-4, "frequency_penalty": -2, "presence_penalty": -2, "seed": 1},
]


def test_degenerate_sampling_beside_a_stream_fails_nothing(serve_url):
    """Issue 11: degenerate requests next to a running greedy stream. The stream ends with the
    same text as alone, each degenerate request gets an answer, the executor is the same.

    The settings of test_16_concurrent_streams (prompt, 16 tokens): greedy text is the same in a
    batch as alone there; longer answers may flip a near-tie with any neighbour at all."""
    content, max_tokens = PROMPTS[1], 16
    alone = greedy_stream(serve_url, content, max_tokens)
    pid = _health(serve_url)["executor_pid"]
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}

    async def scenario():
        async with httpx.AsyncClient(base_url=serve_url, timeout=60) as client:
            attacks: list[asyncio.Task] = []
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if len(lines) == 4 and not attacks:  # decoding now: send the attack
                        attacks = [asyncio.create_task(client.post(
                            "/v1/chat/completions",
                            json={"messages": FRANCE, "max_tokens": 8, **params}))
                            for params in DEGENERATE]
            events = list(parse_sse_lines(lines))
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
            return (text, events[-2]["choices"][0]["finish_reason"]), await asyncio.gather(
                *attacks)

    streamed, answers = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert streamed == alone
    for params, r in zip(DEGENERATE, answers, strict=True):
        assert r.status_code == 200, (params, r.text)
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), params
    health = _health(serve_url)
    assert health["executor_pid"] == pid and health["executor_restarts"] == 0


def test_killed_executor_fails_in_flight_then_503_then_recovers(serve_url, oai):
    pid = _health(serve_url)["executor_pid"]
    body = {"messages": FRANCE, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        events = []
        for event in parse_sse_lines(lines):
            events.append(event)
            if len(events) == 3:
                os.kill(pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    assert events[-2]["object"] == "error" and events[-2]["code"] == 503
    assert events[-3]["choices"][0]["finish_reason"] == "error"
    r = httpx.post(f"{serve_url}/v1/chat/completions", json={"messages": FRANCE}, timeout=10)
    assert r.status_code == 503 and r.json()["type"] == "service_unavailable"
    assert _health(serve_url)["status"] == "loading"
    health = wait_health(serve_url, START_TIMEOUT_S)
    assert health["executor_pid"] not in (None, pid) and health["executor_restarts"] == 1
    r = oai.chat.completions.create(model="default", messages=FRANCE, temperature=0)
    assert "Paris" in r.choices[0].message.content
