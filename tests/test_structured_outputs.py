"""Grammar-constrained decoding (issue 14): `response_format` and forced tool calls.

The engine tests run a random-weight tiny llama with a byte-level BPE tokenizer
(tests/structured_helpers.py) at temperature 1.0: it samples close to uniformly among the tokens
the grammar allows, so without the mask its answers are never JSON (checked too) and with it
every one must parse and validate. The served tests run `parallax serve` on that model; the
SmolLM2 test runs the built-in model at temperature 1.0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from processes import die_with_pytest, free_port, serving_tiny_models, wait_healthy
from structured_helpers import (
    SCHEMA,
    WEATHER_TOOL,
    answer_text,
    assert_fruit_json_always_validates,
    check_schema,
    make_engine,
    prompt_ids,
    run,
    save_random_model,
)

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.grammar import GrammarMask, GrammarMasker
from parallax.engine.sampler import apply_grammar_mask
from parallax.engine.sampling_params import SamplingParams
from parallax.models.loader import load_shard
from parallax.serving.errors import APIError
from parallax.serving.openai_schemas import parse_chat_request
from parallax.serving.structured import parse_response_format, tokenizer_json
from parallax.serving.tool_grammar import tool_call_grammar

JSON_OBJECT = parse_response_format({"type": "json_object"}).grammar
JSON_SCHEMA = parse_response_format(
    {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA}}).grammar


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    path, tokenizer = save_random_model(tmp_path_factory.mktemp("structured"))
    return path, tokenizer, load_shard(path).model


# ---------------------------------------------------------------- the mask itself


def test_mask_allows_exactly_the_prefixes_of_the_grammar(random_model):
    _, tokenizer, _ = random_model
    masker = GrammarMasker([tokenizer.eos_token_id])
    masker.set_vocab(tokenizer_json(tokenizer))
    grammar = parse_response_format({"type": "json_schema", "json_schema": {
        "name": "c", "schema": {"enum": ["red", "green"]}}}).grammar
    seq = SimpleNamespace(sampling_params=SamplingParams(grammar=grammar), grammar=None,
                          generated_token_ids=[])

    def allowed() -> set[int]:
        mask = masker.wait(masker.start([seq]))
        assert mask.rows == [0] and not mask.errors
        bits = ((mask.bits[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1)
        return set(bits.flatten().nonzero().flatten().tolist())

    special = set(tokenizer.all_special_ids)
    words = ['"red"', '"green"']
    expected = {t for t in range(len(tokenizer)) if t not in special
                and (piece := tokenizer.decode([t])) and any(w.startswith(piece) for w in words)}
    assert allowed() == expected
    assert tokenizer.eos_token_id not in expected
    seq.generated_token_ids = tokenizer.encode('"red"', add_special_tokens=False)
    assert allowed() == {tokenizer.eos_token_id}  # complete: only EOS may follow
    assert seq.grammar.matcher.is_stopped()
    masker.close()


def test_apply_grammar_mask_touches_only_constrained_rows():
    vocab = 70  # three mask words: the last one covers padding beyond the vocabulary too
    logits = torch.randn(3, vocab)
    bits = torch.zeros(1, 3, dtype=torch.int32)
    bits[0, 0] = (1 << 3) | -(1 << 31)  # bit 31 is the sign bit of an int32
    bits[0, 2] = 1 << 1  # token 65
    masked = apply_grammar_mask(logits, GrammarMask([1], bits, {}))
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    finite = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert finite == [3, 31, 65]
    assert torch.equal(masked[1, finite], logits[1, finite])
    assert apply_grammar_mask(logits, None) is logits


# ---------------------------------------------------------------- the engine


@pytest.mark.slow
def test_json_object_and_schema_at_temperature_one(random_model):
    _, tokenizer, model = random_model
    engine = make_engine(model, tokenizer)
    prompt = prompt_ids(tokenizer)
    requests = {}
    for seed in range(3):
        requests[f"schema{seed}"] = (prompt, SamplingParams(temperature=1.0, seed=seed,
                                                            max_tokens=100, grammar=JSON_SCHEMA))
        requests[f"free{seed}"] = (prompt, SamplingParams(temperature=1.0, seed=seed,
                                                          max_tokens=24))
    # any object: a random model may write one string for ever, so these are seeds whose
    # object closes within max_tokens (every token of it was still drawn at temperature 1)
    for seed in (1, 2, 5):
        requests[f"object{seed}"] = (prompt, SamplingParams(temperature=1.0, seed=seed,
                                                            max_tokens=120, grammar=JSON_OBJECT))
    out = run(engine, requests)
    for rid, (tokens, reason) in out.items():
        text = answer_text(tokenizer, tokens)
        if rid.startswith("free"):  # the same model unconstrained: not JSON (the test can fail)
            with pytest.raises(ValueError):
                json.loads(text)
            continue
        assert reason == "stop", (rid, text)
        value = json.loads(text)
        assert isinstance(value, dict)
        if rid.startswith("schema"):
            check_schema(value, SCHEMA)
    assert engine.num_running == 0


def test_free_row_unchanged_in_a_mixed_batch(random_model):
    _, tokenizer, model = random_model
    prompt = prompt_ids(tokenizer, "Say something.")
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = run(make_engine(model, tokenizer), {"free": (prompt, free)})["free"][0]
    mixed = run(make_engine(model, tokenizer), {
        "c1": (prompt_ids(tokenizer), SamplingParams(temperature=1.0, seed=1, max_tokens=60,
                                                     grammar=JSON_SCHEMA)),
        "free": (prompt, free),
        "c2": (prompt_ids(tokenizer), SamplingParams(temperature=0, max_tokens=60,
                                                     grammar=JSON_SCHEMA)),
    })
    assert mixed["free"][0] == alone
    for rid in ("c1", "c2"):
        check_schema(json.loads(answer_text(tokenizer, mixed[rid][0])), SCHEMA)


def test_replayed_request_resumes_in_the_grammar(random_model):
    """A failover replay prefills prompt + generated ids: the matcher is fed them first."""
    _, tokenizer, model = random_model
    prompt = prompt_ids(tokenizer)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=100, grammar=JSON_SCHEMA)
    full, _ = run(make_engine(model, tokenizer), {"r": (prompt, params)})["r"]
    done = full[:len(full) // 2]
    rest, reason = run(make_engine(model, tokenizer), {"r": (prompt + done, params)},
                       {"r": len(done)})["r"]
    assert reason == "stop"
    check_schema(json.loads(answer_text(tokenizer, done + rest)), SCHEMA)


@pytest.mark.slow
def test_pipeline_last_stage_constrains_with_preemption(random_model):
    """Two stages; the head's KV is tiny, so requests are preempted and replayed downstream:
    the last stage rebuilds its matchers from the tokens it is sent. Prefix caching is off on the
    head: the three equal prompts would share its blocks and nothing would be preempted."""
    path, tokenizer, _ = random_model
    head = Engine(load_shard(path, 0, 2).model,
                  EngineConfig(kv_memory_bytes=10 * 2 * 2 * 2 * 16 * 16 * 4,
                               max_num_batched_tokens=16, enable_prefix_caching=False),
                  [tokenizer.eos_token_id])
    last = Engine(load_shard(path, 2, 4).model, EngineConfig(kv_memory_bytes=4 * 2**20),
                  [tokenizer.eos_token_id])
    last.set_grammar_vocab(tokenizer_json(tokenizer))
    prompt = prompt_ids(tokenizer)
    params = {str(i): SamplingParams(temperature=1.0, seed=i, max_tokens=80, grammar=JSON_SCHEMA)
              for i in range(3)}
    for rid, p in params.items():
        head.add_request(rid, prompt, p)
    out: dict[str, list[int]] = {rid: [] for rid in params}
    finished: dict[str, str] = {}
    for _ in range(3000):
        if not (head.has_work() or last.has_work()):
            break
        outputs = head.step()
        for rid in head.take_preempted():
            last.abort(rid)
        for o in outputs:
            if o.start_position == 0:
                last.abort(o.request_id)
            last.add_hidden(o.request_id, o.token_ids, o.start_position, o.hidden,
                            params[o.request_id], len(prompt), o.due)
        for o in last.step():
            out[o.request_id].append(o.token_id)
            head.append_token(o.request_id, o.token_id, o.finished, o.finish_reason)
            if o.finished:
                finished[o.request_id] = o.finish_reason
    assert head.batcher.num_preemptions > 0
    for rid, tokens in out.items():
        assert finished[rid] == "stop"
        check_schema(json.loads(answer_text(tokenizer, tokens)), SCHEMA)


def test_constrained_request_fails_alone_without_a_vocabulary(random_model):
    _, tokenizer, model = random_model
    engine = Engine(model, EngineConfig(kv_memory_bytes=4 * 2**20), [tokenizer.eos_token_id])
    prompt = prompt_ids(tokenizer)
    engine.add_request("c", prompt, SamplingParams(grammar=JSON_OBJECT, max_tokens=8))
    engine.add_request("free", prompt, SamplingParams(temperature=0, max_tokens=8,
                                                      ignore_eos=True))
    finished = {}
    while engine.has_work():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = (o.finish_reason, o.error)
    assert finished["c"][0] == "error" and "tokenizer" in finished["c"][1]
    assert finished["free"] == ("length", None)


@pytest.mark.slow
def test_forced_tool_call_grammar_in_the_engine(random_model):
    _, tokenizer, model = random_model
    engine = make_engine(model, tokenizer)
    grammar = tool_call_grammar([WEATHER_TOOL], "hermes", parallel=False)
    out = run(engine, {str(s): (prompt_ids(tokenizer), SamplingParams(
        temperature=1.0, seed=s, max_tokens=80, grammar=grammar)) for s in range(2)})
    for tokens, reason in out.values():
        text = answer_text(tokenizer, tokens)
        assert reason == "stop" and text.startswith("<tool_call>\n")
        assert text.endswith("\n</tool_call>")
        call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
        assert call["name"] == "get_weather"
        check_schema(call["arguments"], WEATHER_TOOL["function"]["parameters"])


# ---------------------------------------------------------------- request validation


@pytest.mark.parametrize("response_format, field", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
     "'response_format.json_schema.schema'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "not-a-format"}}}, "'response_format.json_schema.schema'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
     "'response_format.json_schema.schema'"),
    ({"type": "json_schema"}, "'response_format.json_schema'"),
])
def test_bad_response_format_is_a_400_naming_it(response_format, field):
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": response_format}
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    assert info.value.status == 400 and field in info.value.message


def test_forced_tool_with_bad_parameters_is_a_400():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool],
            "tool_choice": "required"}
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    assert "'tools[0].function.parameters'" in info.value.message
    body["tool_choice"] = "auto"  # calls the model starts are constrained too: checked
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    assert "'tools[0].function.parameters'" in info.value.message
    body["tool_choice"] = "none"  # no calls: not checked
    assert parse_chat_request(body).tool_choice == "none"


# ---------------------------------------------------------------- through `parallax serve`


@pytest.fixture(scope="module")
def served(random_model, tmp_path_factory):
    path, _, _ = random_model
    with serving_tiny_models({"random": path}, tmp_path_factory.mktemp("logs")) as clients:
        yield clients["random"]


@pytest.mark.slow
def test_served_json_schema_stream_and_not(served):
    response_format = {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA}}
    messages = [{"role": "user", "content": "An order please."}]
    answer = served.chat.completions.create(model="default", messages=messages, seed=3,
                                            temperature=1.0, max_tokens=100,
                                            response_format=response_format)
    assert answer.choices[0].finish_reason == "stop"
    check_schema(json.loads(answer.choices[0].message.content), SCHEMA)
    stream = served.chat.completions.create(model="default", messages=messages, seed=4,
                                            temperature=1.0, max_tokens=100, stream=True,
                                            response_format=response_format)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check_schema(json.loads(text), SCHEMA)
    answer = served.chat.completions.create(model="default", messages=messages, seed=5,
                                            max_tokens=150,
                                            response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.slow
def test_served_tool_choice_required_and_named(served):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        answer = served.chat.completions.create(
            model="default", messages=messages, temperature=1.0, seed=2, max_tokens=120,
            tools=[WEATHER_TOOL], tool_choice=choice, parallel_tool_calls=False)
        choice0 = answer.choices[0]
        assert choice0.finish_reason == "tool_calls"
        assert not choice0.message.content
        (call,) = choice0.message.tool_calls
        assert call.function.name == "get_weather"
        check_schema(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


@pytest.mark.slow
def test_served_bad_schema_is_a_400(served):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        served.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert "response_format" in str(info.value)
    answer = served.chat.completions.create(  # the server is fine afterwards
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_json_schema_always_validates(tmp_path):
    """20 sampled answers (temperature 1.0, max_tokens 160) of the built-in model, batched:
    every one parses and validates."""
    import openai

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "parallax.cli", "serve", "--port", str(port),
             "--max-batch-size", "20", "--kv-memory", "256MB"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_pytest)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log_path, timeout=300)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600,
                               max_retries=0)
        assert_fruit_json_always_validates(client)
    finally:
        proc.kill()
        proc.wait(10)
