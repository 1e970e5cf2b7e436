"""`logprobs` / `top_logprobs`: the sampler's values against the engine's logits and the model
forward, the wire between stages, the OpenAI response shapes through `parallax serve`, and the
request checks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import httpx
import msgspec
import openai
import pytest
import torch
from processes import die_with_pytest, free_port
from test_pipeline_links import Cluster
from test_serve import wait_health
from tiny_models import save_tiny_model

import parallax.engine.engine as engine_module
from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampler import LOGPROB_FLOOR, sample, token_logprobs
from parallax.engine.sampling_params import SamplingParams
from parallax.models.loader import load_shard
from parallax.node.links import LinkLimits, link_problem
from parallax.protocol.common import TokenOutput, encode
from parallax.protocol.ipc import AddRequest, decode_to_executor
from parallax.protocol.links import LinkTokens, decode_link
from parallax.serving.errors import APIError
from parallax.serving.openai_schemas import parse_chat_request, to_sampling_params
from parallax.serving.sse import parse_sse_lines

PROMPT = [5, 17, 99, 3, 250, 42, 7, 7, 120]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True,
                        top_logprobs=5)
WARM = SamplingParams(temperature=0.7, seed=3, max_tokens=6, ignore_eos=True, logprobs=True,
                      top_logprobs=20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("logprobs"), "llama")


def run_capturing_logits(model, requests: dict[str, tuple[list[int], SamplingParams]],
                         monkeypatch) -> tuple[dict[str, list], dict[str, list[torch.Tensor]]]:
    """Drive an engine; return its outputs and the logits row it sampled each token from."""
    rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in requests}
    engine = Engine(model, EngineConfig(kv_memory_bytes=4 * 2**20))

    def spy(logits, params, generated, generators):
        spy.batches.append(logits.clone())
        return sample(logits, params, generated, generators)

    spy.batches = []
    monkeypatch.setattr(engine_module, "sample", spy)
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list] = {rid: [] for rid in requests}
    for _ in range(1000):
        if not engine.has_work():
            break
        before = len(spy.batches)
        step = [o for o in engine.step() if o.token_id is not None]
        if len(spy.batches) > before:  # the batch's rows are in the outputs' order
            for row, o in zip(spy.batches[-1], step, strict=True):
                rows[o.request_id].append(row)
        for o in step:
            outputs[o.request_id].append(o)
    return outputs, rows


def test_greedy_and_temperature_logprobs_equal_log_softmax_of_the_logits(tiny, monkeypatch):
    path, hf_model = tiny
    model = load_shard(path).model
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs, rows = run_capturing_logits(model, {
        "greedy": (PROMPT, GREEDY), "warm": (PROMPT[:5], WARM), "plain": (PROMPT[2:], plain),
    }, monkeypatch)
    assert all(o.logprob is None and o.top_logprobs is None for o in outputs["plain"])
    for rid, temperature in (("greedy", 1.0), ("warm", 0.7)):
        assert len(outputs[rid]) == 6
        for o, row in zip(outputs[rid], rows[rid], strict=True):
            expected = torch.log_softmax(row / temperature, -1)
            assert abs(o.logprob - float(expected[o.token_id])) < 1e-4
            values = [lp for _, lp in o.top_logprobs]
            assert values == sorted(values, reverse=True)
            assert len(o.top_logprobs) == (5 if rid == "greedy" else 20)
            top_values, top_ids = torch.topk(expected, len(values))
            assert [i for i, _ in o.top_logprobs] == top_ids.tolist()
            assert max(abs(a - b) for a, b in zip(values, top_values.tolist(), strict=True)) < 1e-4
            if o.token_id == o.top_logprobs[0][0]:
                assert o.logprob == o.top_logprobs[0][1]
        assert all(o.token_id == o.top_logprobs[0][0] for o in outputs["greedy"])
    # the engine's logits are the model's: greedy logprobs against a plain forward pass
    ids = PROMPT + [o.token_id for o in outputs["greedy"]]
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], -1)
    for i, o in enumerate(outputs["greedy"]):
        assert abs(o.logprob - float(reference[len(PROMPT) - 1 + i, o.token_id])) < 1e-4


def test_logprobs_follow_penalties_and_ignore_truncation() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 4
    logits[2, :10] = float("-inf")
    params = [SamplingParams(temperature=0.5, top_k=3, top_p=0.5, min_p=0.2, seed=1,
                             presence_penalty=1.0, logprobs=True, top_logprobs=20),
              SamplingParams(temperature=0.8),  # did not ask: nothing computed
              SamplingParams(temperature=0, logprobs=True, top_logprobs=20)]
    generated = [[1, 1, 4], [2], []]
    tokens = sample(logits, params, generated, [None] * 3)
    out = token_logprobs(logits, params, generated, tokens)
    assert out[1] is None
    penalised = logits[0].clone()
    penalised[[1, 4]] -= 1.0
    expected = torch.log_softmax(penalised / 0.5, -1)  # no top-k / top-p / min-p mask
    assert abs(out[0].logprob - float(expected[tokens[0]])) < 1e-5
    assert len(out[0].top) == 20 and all(math.isfinite(lp) for _, lp in out[0].top)
    # tokens the model rules out are floored (JSON has no -inf)
    assert out[2].top[-1][1] > LOGPROB_FLOOR - 1 and all(lp >= LOGPROB_FLOOR for _, lp in out[2].top)


@pytest.mark.slow
def test_pipeline_head_receives_the_last_stage_logprobs(tiny):
    path, _ = tiny
    cluster = Cluster(path, [(0, 2), (2, 4)])
    try:
        cluster.add("lp", PROMPT, GREEDY)
        cluster.add("plain", PROMPT, SamplingParams(temperature=0, max_tokens=6,
                                                    ignore_eos=True))
        out = cluster.run()
    finally:
        cluster.close()
    whole = Engine(load_shard(path).model, EngineConfig(kv_memory_bytes=4 * 2**20))
    whole.add_request("lp", PROMPT, GREEDY)
    expected = []
    while whole.has_work():
        expected += [o for o in whole.step() if o.token_id is not None]
    tokens = [o for o in out["lp"] if o.token_id is not None]
    assert [o.token_id for o in tokens] == [o.token_id for o in expected]
    for got, want in zip(tokens, expected, strict=True):
        assert abs(got.logprob - want.logprob) < 1e-4 and len(got.top_logprobs) == 5
        assert [i for i, _ in got.top_logprobs] == [i for i, _ in want.top_logprobs]
    assert all(o.logprob is None and not o.top_logprobs for o in out["plain"])


def test_stage_tokens_logprobs_are_validated_on_receipt() -> None:
    limits = LinkLimits(vocab_size=100, hidden_size=8, max_tokens=64, max_position=128)

    def problem(**fields: Any) -> str | None:
        output = TokenOutput("r", **{"token_id": 3, **fields})
        wire = decode_link(encode(LinkTokens([output])))  # travels unchanged
        assert repr(wire.outputs[0]) == repr(output)
        return link_problem(wire, limits)

    assert problem(logprob=-0.5, top_logprobs=[(3, -0.5), (9, -2.0)]) is None
    assert problem() is None
    assert "logprob" in problem(logprob=float("nan"))
    assert "logprob" in problem(logprob=float("-inf"))
    assert "logprob" in problem(logprob=3.0)
    assert "top logprobs" in problem(logprob=-1.0, top_logprobs=[(1, -1.0)] * 21)
    assert "vocabulary" in problem(logprob=-1.0, top_logprobs=[(100, -1.0)])
    assert "top logprob" in problem(logprob=-1.0, top_logprobs=[(1, float("inf"))])
    assert "without a token" in problem(token_id=None, logprob=-1.0)


# ---------------------------------------------------------------- request checks


def body(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(("payload", "fragments"), [
    (body(top_logprobs=2), ["'top_logprobs'", "'logprobs' to be true"]),
    (body(logprobs=False, top_logprobs=2), ["'top_logprobs'", "'logprobs' to be true"]),
    (body(logprobs=True, top_logprobs=21), ["'top_logprobs'", "[0, 20]"]),
    (body(logprobs=True, top_logprobs=-1), ["'top_logprobs'"]),
    (body(logprobs=True, top_logprobs=True), ["'top_logprobs'", "integer"]),
    (body(logprobs=True, top_logprobs=1.5), ["'top_logprobs'", "integer"]),
    (body(logprobs="true"), ["'logprobs'", "boolean"]),
    (body(logprobs=1), ["'logprobs'", "boolean"]),
])
def test_bad_logprobs_fields_are_400_naming_the_field(payload, fragments) -> None:
    with pytest.raises(APIError) as info:
        parse_chat_request(payload)
    assert info.value.status == 400
    assert all(f in info.value.message for f in fragments), info.value.message


def test_logprobs_fields_reach_the_sampling_params() -> None:
    for fields, want in ((body(), (False, 0)), (body(logprobs=True), (True, 0)),
                         (body(logprobs=True, top_logprobs=20), (True, 20)),
                         (body(logprobs=True, top_logprobs=0), (True, 0)),
                         (body(logprobs=False, top_logprobs=0), (False, 0)),
                         (body(logprobs=None, top_logprobs=None), (False, 0))):
        params = to_sampling_params(parse_chat_request(fields), 16)
        assert (params.logprobs, params.top_logprobs) == want
        # the params travel to the executor and to later stages as msgpack
        wire = decode_to_executor(encode(AddRequest("r", [1], params)))
        assert wire.sampling_params == params
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(logprobs=True, top_logprobs=21).validate()
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(top_logprobs=2).validate()
    assert msgspec.json.decode(msgspec.json.encode(SamplingParams())) is not None


# ---------------------------------------------------------------- through `parallax serve`


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory):
    """`parallax serve` on the built-in model (SmolLM2)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve_lp") / "serve.log"
    log = open(log_path, "wb")
    cmd = [sys.executable, "-m", "parallax.cli", "serve", "--port", str(port),
           "--max-batch-size", "8", "--kv-memory", "128MB"]
    env = {**os.environ, "TMPDIR": str(log_path.parent)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=die_with_pytest)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, 180, proc)
        yield url
    except Exception:
        print(open(log_path).read()[-5000:])
        raise
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def check_entry(entry: Any, num_top: int) -> None:
    assert isinstance(entry.token, str) and entry.logprob <= 0 and math.isfinite(entry.logprob)
    assert entry.bytes == list(entry.token.encode("utf-8"))
    assert len(entry.top_logprobs) == num_top
    values = [t.logprob for t in entry.top_logprobs]
    assert values == sorted(values, reverse=True)
    for top in entry.top_logprobs:
        assert isinstance(top.token, str) and top.bytes == list(top.token.encode("utf-8"))


@pytest.mark.slow
def test_serve_logprobs_stream_and_non_stream(serve_url):
    oai = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", timeout=60,
                        max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = oai.chat.completions.create(model="default", messages=messages, max_tokens=12,
                                         temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens > 2
    for entry in content:
        check_entry(entry, 3)
        assert entry.token == entry.top_logprobs[0].token  # greedy: the chosen is the best
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-6
    text = answer.choices[0].message.content
    assert text and "".join(e.token for e in content).startswith(text)  # + EOS, when it ended

    stream = oai.chat.completions.create(model="default", messages=messages, max_tokens=12,
                                         temperature=0, logprobs=True, top_logprobs=3,
                                         stream=True)
    chunks = list(stream)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    # same tokens; the values may differ in float rounding (the prompt's KV is cached now)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(streamed, content, strict=True))
    for c in chunks:  # each chunk carries the entries of the tokens it carries the text of
        if c.choices and c.choices[0].logprobs and c.choices[0].delta.content:
            assert "".join(e.token for e in c.choices[0].logprobs.content) == \
                c.choices[0].delta.content
    assert chunks[-1].usage.completion_tokens == len(streamed)

    plain = oai.chat.completions.create(model="default", messages=messages, max_tokens=4,
                                        temperature=0)
    assert plain.choices[0].logprobs is None
    sampled = oai.chat.completions.create(model="default", messages=messages, max_tokens=8,
                                          temperature=0.7, seed=1, logprobs=True)
    assert len(sampled.choices[0].logprobs.content) == sampled.usage.completion_tokens
    assert all(e.top_logprobs == [] for e in sampled.choices[0].logprobs.content)


@pytest.mark.slow
def test_serve_stop_string_tokens_come_with_a_later_chunk(serve_url):
    payload = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 20, "temperature": 0, "logprobs": True, "stream": True}
    full = httpx.post(f"{serve_url}/v1/chat/completions", json={**payload, "stream": False},
                      timeout=60).json()
    text = full["choices"][0]["message"]["content"]
    stop = text.split()[2] if len(text.split()) > 3 else text[-3:]
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions",
                      json={**payload, "stop": [stop]}, timeout=60) as response:
        events = [e for e in parse_sse_lines(response.iter_lines()) if e != "[DONE]"]
    entries = [e for ev in events for e in ((ev["choices"][0].get("logprobs") or {})
                                            .get("content") or [])]
    assert len(entries) == events[-1]["usage"]["completion_tokens"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    shown = "".join(ev["choices"][0]["delta"].get("content", "") for ev in events)
    assert stop not in shown and "".join(e["token"] for e in entries).startswith(shown)
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions",
                      json={**payload, "top_logprobs": 30}, timeout=60) as response:
        assert response.status_code == 400
