"""`/v1/completions`, the legacy text-completion API: parsing, the node path, the scheduler path.

- parsing: the prompt forms, OpenAI's default of 16 tokens, and a 400 naming each field that
  cannot be served (`suffix`, `n`, `best_of`, legacy `logprobs` > 5, `echo` of token ids...).
- the node (the frontend against the scripted fake executor of tests/test_serve_frontend.py): the
  prompt reaches the executor as is (no chat template), answers and streams are
  `text_completion` objects, `echo` prepends the prompt.
- the scheduler (scripted heads of tests/test_replay_scheduler.py): the request goes to the
  heads' `/v1/completions` and a broken pipeline is replayed there, the client seeing one stream.
- the real SmolLM2 completes "The capital of France is" with Paris (slow).
"""

from __future__ import annotations

import httpx
import openai
import pytest
from fake_scheduler import serving
from fastapi import Request
from fastapi.responses import StreamingResponse
from processes import serving_tiny_models
from test_replay_scheduler import FULL, TOTAL, ScriptedHeads
from test_scheduler_app import WHOLE, Scheduler, sse_events
from test_serve_frontend import CharTokenizer, Harness, run

from parallax.chat.server import build_chat_app
from parallax.config import ChatConfig
from parallax.models.hub import builtin_gguf_path
from parallax.protocol.ipc import AddRequest
from parallax.serving.completions import (
    DEFAULT_MAX_TOKENS,
    CompletionAdapter,
    legacy_logprobs,
    parse_completion_request,
)
from parallax.serving.errors import APIError

# ---- parsing ----------------------------------------------------------------------------------


def test_prompt_forms_and_defaults():
    req = parse_completion_request({"prompt": "Hello", "temperature": 0, "stop": ["."]})
    assert req.prompt == "Hello" and req.max_tokens == DEFAULT_MAX_TOKENS
    assert req.temperature == 0 and req.stop == ["."] and req.messages == []
    assert parse_completion_request({"prompt": ["Hi"]}).prompt == "Hi"
    req = parse_completion_request({"prompt": [1, 2, 3], "max_tokens": 5, "logprobs": 2})
    assert req.prompt == [1, 2, 3] and req.max_tokens == 5
    assert req.logprobs and req.top_logprobs == 2 and req.legacy_logprobs == 2


@pytest.mark.parametrize("body, named", [
    ({}, "'prompt' is required"),
    ({"prompt": ["a", "b"]}, "several prompts"),
    ({"prompt": [1, -2]}, ">= 0"),
    ({"prompt": "x", "suffix": "y"}, "'suffix'"),
    ({"prompt": "x", "n": 2}, "'n'"),
    ({"prompt": "x", "best_of": 3}, "'best_of'"),
    ({"prompt": "x", "logprobs": 6}, "'logprobs'"),
    ({"prompt": "x", "logprobs": True}, "'logprobs'"),
    ({"prompt": [1, 2], "echo": True}, "'echo'"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "'echo'"),
    ({"prompt": "x", "messages": []}, "'messages'"),
    ({"prompt": "x", "tools": []}, "'tools'"),
    ({"prompt": "x", "temperature": -1}, "'temperature'"),
    ({"prompt": "x", "max_tokens": 0}, "'max_tokens'"),
])
def test_bad_requests_name_the_field(body, named):
    with pytest.raises(APIError) as info:
        parse_completion_request(body)
    assert info.value.status == 400 and named in info.value.message


def test_legacy_logprobs_shape():
    entries = [{"token": "Par", "logprob": -0.5, "top_logprobs": [
                   {"token": "Par", "logprob": -0.5}, {"token": "Lon", "logprob": -1.5}]},
               {"token": "is", "logprob": -0.1, "top_logprobs": []}]
    assert legacy_logprobs(entries, 4) == {
        "tokens": ["Par", "is"], "token_logprobs": [-0.5, -0.1],
        "top_logprobs": [{"Par": -0.5, "Lon": -1.5}, {}], "text_offset": [4, 7]}


def test_adapter_streams_text_completion_chunks_with_offsets():
    adapter = CompletionAdapter(logprobs=True)

    def chunk(delta, finish=None, entries=None):
        return {"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": {"content": entries} if entries else None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    assert adapter.on_event(chunk({"role": "assistant", "content": ""})) == []
    first = adapter.on_event(chunk({"content": "ab"}, entries=[
        {"token": "a", "logprob": -1.0, "top_logprobs": []},
        {"token": "b", "logprob": -2.0, "top_logprobs": []}]))[0]
    second = adapter.on_event(chunk({"content": "c"}, entries=[
        {"token": "c", "logprob": -3.0, "top_logprobs": []}]))[0]
    final = adapter.on_event({**chunk({}, "stop"), "metrics": {"tps": 1.0}})[0]
    assert first["object"] == "text_completion" and first["choices"][0]["text"] == "ab"
    assert first["choices"][0]["logprobs"]["text_offset"] == [0, 1]
    assert second["choices"][0]["logprobs"]["text_offset"] == [2]
    assert final["choices"][0]["finish_reason"] == "stop" and final["metrics"] == {"tps": 1.0}
    error = {"object": "error", "message": "x", "type": "server_error", "code": 500}
    assert adapter.on_event(error) == [error]


# ---- the node ---------------------------------------------------------------------------------


def completions_of(events: list) -> list[dict]:
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    return chunks


def test_node_completes_the_raw_prompt():
    async def scenario():
        async with Harness() as h:
            r = await h.http.post("/v1/completions", json={"prompt": "REPLY:abcdefghijklmnopqrst"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "text_completion"
            choice = body["choices"][0]
            assert choice["text"] == "abcdefghijklmnop"  # 16 tokens: OpenAI's default
            assert choice["finish_reason"] == "length" and choice["logprobs"] is None
            assert body["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
            assert set(body["metrics"]) >= {"ttft_ms", "tps", "duration_ms"}
            add = [m for m in h.launched[0].received if isinstance(m, AddRequest)][-1]
            # no chat template: the prompt's own characters
            assert add.prompt_token_ids == [ord(c) for c in "REPLY:abcdefghijklmnopqrst"]
            assert add.sampling_params.max_tokens == DEFAULT_MAX_TOKENS

            r = await h.http.post("/v1/completions", json={
                "prompt": [ord(c) for c in "REPLY:xyz"], "echo": False})
            assert r.json()["choices"][0]["text"] == "xyz"

            r = await h.http.post("/v1/completions", json={"prompt": "REPLY:hi there",
                                                           "echo": True, "max_tokens": 50})
            assert r.json()["choices"][0]["text"] == "REPLY:hi therehi there"

    run(scenario())


def test_node_streams_text_completion_chunks():
    async def scenario():
        async with Harness() as h:
            r = await h.http.post("/v1/completions", json={
                "prompt": "REPLY:Hello world", "stream": True, "echo": True, "max_tokens": 100,
                "stream_options": {"include_usage": True}})
            assert r.status_code == 200, r.text
            from parallax.serving.sse import parse_sse_lines
            chunks = completions_of(list(parse_sse_lines(r.text.splitlines())))
            text = "".join(c["choices"][0]["text"] for c in chunks)
            assert text == "REPLY:Hello world" + "Hello world"
            assert chunks[0]["choices"][0]["text"] == "REPLY:Hello world"  # the echo first
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
            assert "metrics" in chunks[-1] and chunks[-1]["usage"]["completion_tokens"] == 11
            assert len({c["id"] for c in chunks}) == 1

    run(scenario())


def test_node_speaks_the_internal_leg_to_the_scheduler():
    """A head answers the scheduler's /v1/completions in chat chunks with their token ids (the
    scheduler translates), and a replay resumes after the ids it is given."""
    async def scenario():
        async with Harness() as h:
            r = await h.http.post("/v1/completions", json={
                "prompt": "REPLY:abcdef\x1e", "stream": True, "max_tokens": 50,
                "parallax": {"internal": True, "resume_token_ids": [ord("a"), ord("b")]}})
            assert r.status_code == 200, r.text
            from parallax.serving.sse import parse_sse_lines
            events = list(parse_sse_lines(r.text.splitlines()))
            chunks = [e for e in events[:-1] if e["object"] == "chat.completion.chunk"]
            assert len(chunks) == len(events) - 1
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            ids = [i for c in chunks for i in c.get("parallax", {}).get("token_ids", [])]
            assert text == "cdef" and ids == [ord(c) for c in "cdef"]
            add = [m for m in h.launched[0].received if isinstance(m, AddRequest)][-1]
            assert add.prompt_token_ids == [ord(c) for c in "REPLY:abcdef\x1e" + "ab"]

    run(scenario())


class SizedTokenizer(CharTokenizer):
    def __len__(self) -> int:
        return 0x110000  # every code point


def test_node_errors_are_the_contract_body():
    async def scenario():
        async with Harness() as h:
            h.frontend.tokenizer = SizedTokenizer()
            for body, status in (({"prompt": "x", "suffix": "y"}, 400),
                                 ({"prompt": [10**9]}, 400),
                                 ({"prompt": "x", "model": "other"}, 404)):
                r = await h.http.post("/v1/completions", json=body)
                assert r.status_code == status, r.text
                error = r.json()
                assert error["object"] == "error" and error["code"] == status
                assert error["message"]

    run(scenario())


# ---- the scheduler ----------------------------------------------------------------------------


class CompletionHeads(ScriptedHeads):
    """Scripted heads that also answer `/v1/completions` (the prompt is the script)."""

    def _app(self):
        app = super()._app()

        @app.post("/v1/completions")
        async def completions(request: Request):
            node_id = self.node_of_port[request.scope["server"][1]]
            body = await request.json()
            self.received.append((node_id, body))
            script = body["prompt"].split()
            return StreamingResponse(self._script(node_id, body, script),
                                     media_type="text/event-stream")

        return app


@pytest.fixture
def heads():
    fake = CompletionHeads()
    yield fake
    fake.server.stop()


@pytest.fixture
def scheduler(heads):
    s = Scheduler(heads, replay_keepalive_s=0.1, replay_wait_s=5.0)
    s.bring_up({"a": WHOLE, "b": WHOLE})
    yield s
    s.stop()


def test_scheduler_replays_a_broken_completion_on_the_heads_completions(scheduler, heads):
    r = scheduler.http.post("/v1/completions", json={"prompt": "FAIL 3 peer_lost BLAME",
                                                     "stream": True, "max_tokens": 50})
    assert r.status_code == 200, r.text
    chunks = completions_of(sse_events(r))
    assert "".join(c["choices"][0]["text"] for c in chunks) == FULL
    assert len({c["id"] for c in chunks}) == 1 and "parallax" not in r.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["metrics"]["failovers"] == 1
    (first_head, first), (second_head, second) = heads.received
    assert first_head != second_head and first["prompt"] == second["prompt"]  # both legacy
    assert second["parallax"]["resume_token_ids"] == [0, 1, 2]


def test_scheduler_non_streaming_completion(scheduler, heads):
    r = scheduler.http.post("/v1/completions", json={"prompt": "FAIL 2 stage_timeout BLAME",
                                                     "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["text"] == "FAIL 2 stage_timeout BLAME" + FULL
    assert body["usage"]["completion_tokens"] == TOTAL and body["metrics"]["failovers"] == 1
    r = scheduler.http.post("/v1/completions", json={"prompt": "OK", "n": 3})
    assert r.status_code == 400 and "'n'" in r.json()["message"]


@pytest.mark.slow
def test_chat_proxy_serves_both_new_endpoints(scheduler):
    """`parallax chat` proxies /v1/completions and /v1/responses to the scheduler."""
    config = ChatConfig(scheduler=scheduler.url.removeprefix("http://"), port=0)
    with serving(build_chat_app(config)) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "OK", "max_tokens": 50},
                       timeout=20)
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "text_completion"
        assert r.json()["choices"][0]["text"] == FULL
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=20)
        assert client.responses.create(model="default", input="OK").output_text == FULL


# ---- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_greedy_completion_names_paris(tmp_path):
    with serving_tiny_models({"smol": builtin_gguf_path()}, tmp_path) as clients:
        r = clients["smol"].completions.create(model="default",
                                               prompt="The capital of France is",
                                               max_tokens=8, temperature=0, logprobs=2)
        choice = r.choices[0]
        assert "Paris" in choice.text, choice.text
        assert r.object == "text_completion" and r.usage.completion_tokens >= 1
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == r.usage.completion_tokens
        assert all(lp <= 0 for lp in logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in logprobs.top_logprobs)
        assert "".join(logprobs.tokens) == choice.text
