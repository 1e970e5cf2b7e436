"""Engine behaviour on a tiny random Llama: batching, chunked prefill, KV blocks, prefix cache,
preemption, pipelines of engines, sampling."""

from __future__ import annotations

import random

import pytest
import torch
from test_moe_families import engine_logits
from test_pipeline_links import pipeline_greedy_tokens
from tiny_models import attach_cache, greedy_tokens, prefill_hidden, save_tiny_model

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models.loader import load_shard

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
BF16_LOGITS_ATOL = 0.02  # bf16 against fp32 on the tiny Llama, logits of scale ~0.5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path, _ = save_tiny_model(tmp_path_factory.mktemp("engine"), "llama")
    return path


@pytest.fixture
def model(model_path):
    return load_shard(model_path).model


def prompts_of_lengths(lengths, seed=1):
    rng = random.Random(seed)
    return [[rng.randrange(1, 256) for _ in range(n)] for n in lengths]


def drain(engine: Engine, limit: int = 5000) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(limit):
        if not engine.has_work():
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o.token_id)
    raise AssertionError("engine did not finish")


@pytest.mark.slow
def test_batch_of_eight_equals_each_alone(model):
    prompts = prompts_of_lengths([1, 3, 7, 16, 17, 33, 50, 90])
    together = greedy_tokens(model, prompts, max_tokens=12)
    alone = [greedy_tokens(model, [p], max_tokens=12)[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)


@pytest.mark.slow
def test_request_added_mid_flight(model):
    prompts = prompts_of_lengths([5, 40, 12])
    alone = [greedy_tokens(model, [p], max_tokens=12)[0] for p in prompts]
    engine = Engine(model, EngineConfig(kv_memory_bytes=4 * 2**20))
    engine.add_request("0", prompts[0], GREEDY)
    engine.add_request("1", prompts[1], GREEDY)
    out: dict[str, list[int]] = {}
    for step in range(200):
        if step == 4:
            engine.add_request("2", prompts[2], GREEDY)
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o.token_id)
        if step > 4 and not engine.has_work():
            break
    assert [out["0"], out["1"], out["2"]] == alone


@pytest.mark.slow
def test_chunked_prefill_keeps_decodes_running_and_same_tokens(model):
    short, long = prompts_of_lengths([4, 120])
    expected = [greedy_tokens(model, [p], max_tokens=12)[0] for p in (short, long)]
    engine = Engine(model, EngineConfig(kv_memory_bytes=4 * 2**20, max_num_batched_tokens=16))
    engine.add_request("short", short, GREEDY)
    engine.step()  # short prefilled
    engine.add_request("long", long, GREEDY)
    # While the 120-token prompt is chunked (16 per step), the short request keeps decoding.
    produced = [o.request_id for _ in range(5) for o in engine.step()]
    assert produced.count("short") == 5
    out = drain(engine)
    assert out["long"] == expected[1]


def test_all_blocks_free_after_finish_and_abort(model):
    engine = Engine(model, EngineConfig(kv_memory_bytes=2 * 2**20))
    total = engine.num_total_blocks
    for i, prompt in enumerate(prompts_of_lengths([10, 20, 30, 40])):
        engine.add_request(str(i), prompt, GREEDY)
    engine.step()
    engine.step()
    assert engine.num_free_blocks < total
    assert engine.abort("1") and engine.abort("3")
    assert not engine.abort("unknown")
    drain(engine)
    assert engine.num_free_blocks == total
    assert engine.num_running == engine.num_waiting == 0


@pytest.mark.slow
def test_prefix_cache_hit_skips_shared_prefill_with_identical_tokens(model):
    shared = prompts_of_lengths([48], seed=7)[0]
    first, second = shared + [11, 12, 13], shared + [21, 22]
    reference = Engine(model, EngineConfig(kv_memory_bytes=4 * 2**20, enable_prefix_caching=False))
    reference.add_request("b", second, GREEDY)
    expected = drain(reference)["b"]
    engine = Engine(model, EngineConfig(kv_memory_bytes=4 * 2**20))
    engine.add_request("a", first, GREEDY)
    drain(engine)
    assert engine.block_manager.num_prefix_hit_tokens == 0
    engine.add_request("b", second, GREEDY)
    out = drain(engine)
    assert engine.block_manager.num_prefix_hit_tokens == 48  # three full 16-token blocks
    assert out["b"] == expected


@pytest.mark.slow
def test_preemption_when_blocks_run_out_still_completes(model):
    prompts = prompts_of_lengths([30, 30, 30, 30])
    expected = [greedy_tokens(model, [p], max_tokens=40)[0] for p in prompts]
    # 4 x (30 + 40) tokens need ~20 blocks of 16; give the cache 10.
    per_block = 2 * 4 * 2 * 16 * 16 * 4  # K+V, layers, kv heads, head dim, block, fp32
    engine = Engine(model, EngineConfig(kv_memory_bytes=10 * per_block))
    assert engine.num_total_blocks == 10
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    out = drain(engine)
    assert engine.take_preempted()  # preemption really happened
    assert [out[str(i)] for i in range(4)] == expected
    assert engine.num_free_blocks == 10


def test_prompt_larger_than_cache_is_rejected_not_hung(model):
    engine = Engine(model, EngineConfig(kv_memory_bytes=2 * 2 * 4 * 2 * 16 * 16 * 4))
    with pytest.raises(ValueError, match="raise the KV memory budget"):
        engine.add_request("x", list(range(1, 100)), GREEDY)


@pytest.mark.slow
def test_seeded_sampling_reproducible_and_filters(model):
    prompt = prompts_of_lengths([6])[0]

    def run(params):
        engine = Engine(model, EngineConfig(kv_memory_bytes=2**22))
        engine.add_request("x", prompt, params)
        return drain(engine)["x"]

    sampled = SamplingParams(temperature=1.5, seed=1234, max_tokens=16, ignore_eos=True)
    assert run(sampled) == run(sampled)
    assert run(sampled) != run(SamplingParams(temperature=1.5, seed=99, max_tokens=16,
                                              ignore_eos=True))
    greedy = run(SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert run(SamplingParams(temperature=1.0, top_k=1, seed=5, max_tokens=16,
                              ignore_eos=True)) == greedy
    assert run(SamplingParams(temperature=1.0, top_p=1e-6, seed=5, max_tokens=16,
                              ignore_eos=True)) == greedy
    assert run(SamplingParams(temperature=1.0, min_p=1.0, seed=5, max_tokens=16,
                              ignore_eos=True)) == greedy
    penalised = run(SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0,
                                   max_tokens=16, ignore_eos=True))
    assert penalised != greedy
    assert max(penalised.count(t) for t in penalised) <= max(greedy.count(t) for t in greedy)


def test_eos_and_stop_token_and_max_tokens(model):
    prompt = prompts_of_lengths([6])[0]
    greedy = greedy_tokens(model, [prompt], max_tokens=10)[0]
    stop_at = greedy[4]
    engine = Engine(model, EngineConfig(kv_memory_bytes=2**22), eos_token_ids=[stop_at])
    engine.add_request("eos", prompt, SamplingParams(temperature=0, max_tokens=10))
    engine.add_request("stop", prompt, SamplingParams(temperature=0, max_tokens=10,
                                                      stop_token_ids=(greedy[2],),
                                                      ignore_eos=True))
    engine.add_request("len", prompt, SamplingParams(temperature=0, max_tokens=3,
                                                     ignore_eos=True))
    finals = {}
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o.token_id)
            if o.finished:
                finals[o.request_id] = o.finish_reason
    assert out["eos"] == greedy[: greedy.index(stop_at) + 1] and finals["eos"] == "stop"
    assert out["stop"] == greedy[: greedy.index(greedy[2]) + 1] and finals["stop"] == "stop"
    assert out["len"] == greedy[:3] and finals["len"] == "length"


def test_invalid_requests_raise_clear_errors(model):
    engine = Engine(model, EngineConfig(kv_memory_bytes=2**22))
    with pytest.raises(ValueError, match="no tokens"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.add_request("b", [1] * 600, GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request("c", [1], SamplingParams(temperature=-1))
    engine.add_request("d", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already running"):
        engine.add_request("d", [1, 2], GREEDY)


def test_bf16_engine_stays_within_bf16_rounding_of_fp32(model_path, model):
    """bf16 weights, activations and KV through the engine against the fp32 model teacher-forced
    on the same tokens: every logits row of bf16's greedy run is close (observed: max |diff|
    0.004 to 0.007 for logits up to 0.6), and bf16 picks fp32's token wherever fp32's top two are
    further apart than that rounding."""
    prompts = prompts_of_lengths([5, 9, 30])
    rows, _ = engine_logits(load_shard(model_path, dtype=torch.bfloat16).model, prompts,
                            dtype=torch.bfloat16)
    attach_cache(model)
    agreed = clear_rows = 0
    for prompt, bf16 in zip(prompts, rows, strict=True):
        tokens = bf16.argmax(-1).tolist()
        ids = torch.tensor(prompt + tokens[:-1])
        fp32 = model.compute_logits(prefill_hidden(model, ids))[len(prompt) - 1:]
        error = (bf16.float() - fp32).abs()
        print(f"bf16 vs fp32 logits: max |diff| {error.max():.4f}, mean {error.mean():.5f}")
        assert error.max() < BF16_LOGITS_ATOL and error.mean() < BF16_LOGITS_ATOL / 5
        top2 = fp32.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_LOGITS_ATOL
        agreed += int((fp32.argmax(-1) == bf16.argmax(-1))[clear].sum())
        clear_rows += int(clear.sum())
    assert agreed == clear_rows >= 10


@pytest.mark.slow
def test_pipeline_with_chunked_prefill_and_preemption_replay(model_path, model):
    """The head replays a preempted request (prompt + generated) in chunks: the last stage
    must sample only where the head says a token is due."""
    prompts = prompts_of_lengths([30, 30, 30])
    expected = greedy_tokens(model, prompts, max_tokens=40)
    per_block = 2 * 2 * 2 * 16 * 16 * 4  # K+V, head's 2 layers, kv heads, head dim, block, fp32
    configs = [EngineConfig(kv_memory_bytes=kv, max_num_batched_tokens=8)
               for kv in (8 * per_block, 2**22)]
    tokens, engines = pipeline_greedy_tokens(model_path, [(0, 2), (2, 4)], configs, prompts,
                                             max_tokens=40)
    assert engines[0].num_total_blocks == 8
    assert engines[0].batcher.num_preemptions > 0
    assert tokens == expected


# ---------------------------------------------------------------- degenerate sampling (issue 11)


def test_sampler_fails_nan_and_inf_rows_alone():
    from parallax.engine.sampler import RowFailure, sample

    logits = torch.randn(5, 32)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    logits[4, :16] = float("-inf")  # masked vocabulary is fine: the rest is finite
    greedy = SamplingParams(temperature=0)
    for params in ([greedy] * 5,
                   [SamplingParams(temperature=0.8, top_p=0.9, seed=1)] * 5,
                   [SamplingParams(temperature=0, frequency_penalty=1.0)] * 5):
        tokens = sample(logits, params, [[1, 2]] * 5, [None] * 5)
        assert [isinstance(t, RowFailure) for t in tokens] == [False, True, True, True, False]
        assert "NaN or infinite" in tokens[1].message
        assert 0 <= tokens[0] < 32 and 16 <= tokens[4] < 32
    assert sample(logits[[0, 4]], [greedy] * 2, [[], []], [None] * 2) == \
        logits[[0, 4]].argmax(-1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-45, seed=3),  # divides into inf: greedy instead
    SamplingParams(temperature=1e-6, top_p=1e-9, seed=3),
    SamplingParams(temperature=2.0, min_p=1.0, top_k=1, seed=3),
    SamplingParams(temperature=1e-5, top_p=1e-9, min_p=1.0, frequency_penalty=2.0,
                   presence_penalty=2.0, seed=3),
])
def test_sampler_degenerate_params_give_a_token(params):
    from parallax.engine.sampler import sample

    logits = torch.randn(2, 64) * 30
    tokens = sample(logits, [params, SamplingParams(temperature=0)], [[5, 5], [5]], [None, None])
    assert all(isinstance(t, int) and 0 <= t < 64 for t in tokens)
    assert tokens[1] == int(logits[1].argmax())


def test_sampler_error_in_one_row_spares_the_others(monkeypatch):
    from parallax.engine import sampler

    calls = []

    def multinomial(probs, num_samples, generator=None):
        calls.append(probs)
        if len(calls) == 1:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return probs.argmax().reshape(1)

    monkeypatch.setattr(sampler.torch, "multinomial", multinomial)
    params = [SamplingParams(temperature=1.0)] * 2
    tokens = sampler.sample(torch.randn(2, 16), params, [[], []], [None, None])
    assert isinstance(tokens[0], sampler.RowFailure) and "inf, nan" in tokens[0].message
    assert isinstance(tokens[1], int)


def test_tiny_temperature_is_greedy_and_nan_params_are_refused():
    assert SamplingParams(temperature=1e-45).is_greedy
    assert SamplingParams(temperature=9.9e-6).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            SamplingParams(**{name: float("nan")}).validate()


@pytest.mark.slow
def test_nan_logits_fail_one_request_not_its_batch(model):
    """A request whose hidden states turn NaN (here: a poisoned embedding row) fails alone; the
    requests sharing its steps get the same greedy tokens as without it."""
    prompts = prompts_of_lengths([7, 12, 20])
    alone = greedy_tokens(model, prompts, max_tokens=12)
    poison = 255
    with torch.no_grad():
        model.embed_tokens.weight[poison] = float("nan")
    engine = Engine(model, EngineConfig(kv_memory_bytes=4 * 2**20))
    engine.add_request("bad", [poison, 3, 4], GREEDY)  # first: it holds KV block 0
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    out: dict[str, list] = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o)
    assert [(o.finish_reason, o.token_id) for o in out["bad"]] == [("error", None)]
    assert "NaN" in out["bad"][0].error
    assert [[o.token_id for o in out[str(i)]] for i in range(3)] == alone
    assert engine.num_free_blocks == engine.num_total_blocks


@pytest.mark.slow
def test_a_lower_priority_value_is_admitted_first_and_equal_ones_in_arrival_order(model):
    """With the engine full, a priority -1 request that arrives after ten priority 0 ones
    starts before them; the ten keep their arrival order (and a later 0 goes behind them)."""
    engine = Engine(model, EngineConfig(kv_memory_bytes=4 * 2**20, max_num_seqs=1))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("running", [5, 6, 7], params)
    engine.step()  # the engine is full from here on
    for i in range(10):
        engine.add_request(f"p0-{i}", [8, 9], params)
    engine.add_request("urgent", [8, 9], SamplingParams(temperature=0, max_tokens=3,
                                                        ignore_eos=True, priority=-1))
    engine.add_request("p1", [8, 9], SamplingParams(temperature=0, max_tokens=3,
                                                    ignore_eos=True, priority=1))
    engine.add_request("p0-late", [8, 9], params)
    started: list[str] = []
    for _ in range(500):
        if not engine.has_work():
            break
        for o in engine.step():
            if o.request_id not in started:
                started.append(o.request_id)
    assert started == ["running", "urgent", *[f"p0-{i}" for i in range(10)], "p0-late", "p1"]
    with pytest.raises(ValueError, match="priority"):
        SamplingParams(priority=21).validate()
