"""Sliding-window layers keep only the KV blocks they can still read (one KV group per window).

Tiny random models (gpt-oss: sliding / full / sliding / full; Qwen2 with mixed layer_types;
Mistral: every layer sliding) with a window of 8 keys and blocks of 4 tokens run prompts much
longer than the window through the Engine: logits equal transformers', the sliding group's
blocks per sequence stay bounded while the full group's grow, everything is freed at the end,
preemption and a two-stage pipeline still give the single engine's tokens.
"""

from __future__ import annotations

import types

import pytest
import torch
from test_moe_families import (
    NUM_DECODE_STEPS,
    assert_logits_close,
    build_hf_model,
    engine_logits,
    prompts_of_lengths,
    reference_logits,
)
from test_pipeline_links import pipeline_greedy_tokens
from tiny_models import greedy_tokens, save_tiny_model

from parallax.engine.block_manager import BlockManager, GroupedBlockManager
from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.model_runner import kv_bytes_per_token
from parallax.engine.sampling_params import SamplingParams
from parallax.models.llama import LlamaForCausalLM
from parallax.models.loader import load_shard

WINDOW = 8
BLOCK = 4
LONG_PROMPTS = [61, 40, 23, 75]  # all much longer than the window
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_DECODE_STEPS + 1, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    hf_model = build_hf_model("gpt_oss")  # sliding_window=8, layers sliding/full/sliding/full
    path = tmp_path_factory.mktemp("gpt_oss")
    hf_model.save_pretrained(path, safe_serialization=True)
    return str(path), hf_model


def save_dense_windowed(tmp_path_factory, kind: str):
    path = tmp_path_factory.mktemp(kind)
    if kind == "qwen2_mixed":
        return save_tiny_model(path, "qwen2", sliding_window=WINDOW, use_sliding_window=True,
                               layer_types=["sliding_attention", "full_attention",
                                            "full_attention", "sliding_attention"])
    return save_tiny_model(path, "mistral", sliding_window=WINDOW)  # every layer sliding


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return save_dense_windowed(tmp_path_factory, "mistral_all_sliding")


@pytest.fixture(scope="module", params=["qwen2_mixed", "mistral_all_sliding"])
def dense_windowed(request, tmp_path_factory, mistral):
    if request.param == "mistral_all_sliding":
        return mistral
    return save_dense_windowed(tmp_path_factory, request.param)


def run_stepwise(engine: Engine, prompts, params=GREEDY, on_step=None) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for _ in range(5000):
        if not engine.has_work():
            break
        for o in engine.step():
            out[o.request_id].append(o.token_id)
        if on_step is not None:
            on_step(engine)
    return [out[str(i)] for i in range(len(prompts))]


# ---- correctness ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_batched", [512, 16])
def test_gpt_oss_long_prompts_match_transformers(gpt_oss, max_batched):
    """Four prompts far longer than the window, batched, whole or in 16-token chunks."""
    path, hf_model = gpt_oss
    shard = load_shard(path).model
    prompts = prompts_of_lengths(LONG_PROMPTS, seed=5)
    ours, _ = engine_logits(shard, prompts, block_size=BLOCK, max_num_batched_tokens=max_batched)
    for prompt, logits in zip(prompts, ours, strict=True):
        assert logits.shape[0] == NUM_DECODE_STEPS + 1
        assert_logits_close(logits, reference_logits(hf_model, prompt, logits))


def test_dense_families_with_windows_match_transformers(dense_windowed):
    path, hf_model = dense_windowed
    shard = load_shard(path).model
    assert any(layer.sliding_window == WINDOW for layer in shard.attention_layers)
    prompts = prompts_of_lengths([45, 19, 70], seed=7)
    ours, _ = engine_logits(shard, prompts, block_size=BLOCK, max_num_batched_tokens=24)
    for prompt, logits in zip(prompts, ours, strict=True):
        assert_logits_close(logits, reference_logits(hf_model, prompt, logits))


# ---- memory --------------------------------------------------------------------------------


def test_sliding_group_blocks_stay_bounded_while_full_group_grows(gpt_oss):
    path, _ = gpt_oss
    engine = Engine(load_shard(path).model,
                    EngineConfig(kv_memory_bytes=4 * 2**20, block_size=BLOCK,
                                 max_num_batched_tokens=16))
    window, full = engine.block_manager_for(WINDOW), engine.block_manager_for(None)
    assert isinstance(engine.block_manager, GroupedBlockManager)
    live, full_lens, pool_used = [], [], []

    def observe(engine):
        seqs = list(engine.batcher.running)
        live.extend(window.num_live_blocks(s) for s in seqs)
        full_lens.extend(len(s.block_table) for s in seqs)
        pool_used.append(window.num_blocks - window.num_free_blocks)

    prompts = prompts_of_lengths([75, 61], seed=2)
    run_stepwise(engine, prompts, on_step=observe)
    # After a step a sequence keeps only the blocks of its last window - 1 keys.
    assert max(live) <= -(-(WINDOW - 1) // BLOCK) + 1 == 3
    assert max(pool_used) <= 2 * 3
    # The full-attention group holds every position: prompt + generated tokens.
    assert max(full_lens) >= (75 + NUM_DECODE_STEPS) // BLOCK
    assert window.num_free_blocks == window.num_blocks and full.num_free_blocks == full.num_blocks


def test_all_sliding_model_needs_no_blocks_per_context_length(mistral):
    """Mistral-style shards (every layer windowed) have no full group: a prompt longer than
    the whole window pool still runs, in bounded memory."""
    path, _ = mistral
    shard = load_shard(path).model
    assert all(layer.sliding_window == WINDOW for layer in shard.attention_layers)
    # the smallest budget: one sequence's window + one 8-token chunk
    minimum = (-(-(WINDOW - 1 + 8) // BLOCK) + 1) * BLOCK * kv_bytes_per_token(shard, torch.float32)
    engine = Engine(shard, EngineConfig(kv_memory_bytes=minimum, block_size=BLOCK,
                                        max_num_batched_tokens=8, max_num_seqs=1))
    window = engine.block_manager_for(WINDOW)
    assert window.num_blocks * BLOCK < 100  # the minimum: one sequence's window + chunk
    prompt = prompts_of_lengths([100], seed=9)[0]
    (tokens,) = run_stepwise(engine, [prompt])
    assert tokens == greedy_tokens(shard, [prompt], max_tokens=NUM_DECODE_STEPS + 1)[0]
    assert window.num_free_blocks == window.num_blocks


def test_kv_budget_split_rule(gpt_oss):
    """Each window group gets what it can ever need (max_num_seqs sequences' windows plus one
    step's chunks), capped at what one shared pool would give every layer; the full-attention
    layers get the rest."""
    path, _ = gpt_oss
    model = load_shard(path).model
    config = EngineConfig(kv_memory_bytes=4 * 2**20, block_size=BLOCK, max_num_seqs=8,
                          max_num_batched_tokens=64)
    engine = Engine(model, config)
    need = 8 * (-(-(WINDOW - 1) // BLOCK) + 2) + 64 // BLOCK
    window, full = engine.block_manager_for(WINDOW), engine.block_manager_for(None)
    assert window.num_blocks == need
    window_bytes = need * BLOCK * kv_bytes_per_token(model, torch.float32, WINDOW)
    full_block = BLOCK * kv_bytes_per_token(model, torch.float32, None)
    assert full.num_blocks == (config.kv_memory_bytes - window_bytes) // full_block
    assert engine.num_total_blocks == full.num_blocks
    assert model.layers[0].self_attn.k_cache.shape[0] == need * BLOCK
    assert model.layers[1].self_attn.k_cache.shape[0] == full.num_blocks * BLOCK
    # A tight budget: the window group keeps what one shared pool gave it, the full group
    # gets the rest (more than a shared pool gave it).
    shared = 30  # blocks of all layers
    tight = Engine(model, EngineConfig(**{**config.__dict__, "kv_memory_bytes":
                                          shared * BLOCK * kv_bytes_per_token(model, torch.float32)}))
    assert tight.block_manager_for(WINDOW).num_blocks == shared < need
    assert tight.num_total_blocks == shared  # the two groups hold equal bytes per block here
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(model, EngineConfig(**{**config.__dict__, "kv_memory_bytes": 1000}))


def test_full_attention_models_keep_one_group_and_prefix_caching(tmp_path):
    path, _ = save_tiny_model(tmp_path, "llama")
    model = load_shard(path).model
    engine = Engine(model, EngineConfig(kv_memory_bytes=2**20, block_size=BLOCK))
    assert type(engine.block_manager) is BlockManager
    assert engine.block_manager.enable_prefix_caching
    per_block = kv_bytes_per_token(model, torch.float32) * BLOCK
    assert engine.num_total_blocks == 2**20 // per_block
    assert engine.block_manager_for(None) is engine.block_manager


# ---- lifecycle -----------------------------------------------------------------------------


def test_all_blocks_free_after_finish_and_abort(gpt_oss):
    path, _ = gpt_oss
    engine = Engine(load_shard(path).model,
                    EngineConfig(kv_memory_bytes=2**20, block_size=BLOCK,
                                 max_num_batched_tokens=16))
    window, full = engine.block_manager_for(WINDOW), engine.block_manager_for(None)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, prompt in enumerate(prompts_of_lengths([50, 33, 12], seed=4)):
        engine.add_request(str(i), prompt, params)
    for _ in range(8):
        engine.step()
    assert window.num_free_blocks < window.num_blocks and full.num_free_blocks < full.num_blocks
    assert engine.abort("1")
    while engine.has_work():
        engine.step()
    assert window.num_free_blocks == window.num_blocks
    assert full.num_free_blocks == full.num_blocks


def test_preemption_with_window_groups_still_matches(gpt_oss):
    path, _ = gpt_oss
    model = load_shard(path).model
    prompts = prompts_of_lengths([30, 30, 30, 30], seed=6)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [greedy_tokens(model, [p], max_tokens=40, block_size=BLOCK)[0] for p in prompts]
    # A budget of 18 blocks of all layers, while 4 x (30 + 40) tokens need 70 full blocks.
    config = dict(block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=32)
    engine = Engine(model, EngineConfig(
        kv_memory_bytes=18 * BLOCK * kv_bytes_per_token(model, torch.float32), **config))
    assert 70 // 4 < engine.num_total_blocks < 70
    tokens = run_stepwise(engine, prompts, params)
    assert engine.take_preempted()
    assert tokens == expected
    for window in (WINDOW, None):
        manager = engine.block_manager_for(window)
        assert manager.num_free_blocks == manager.num_blocks


def test_preemption_when_the_window_pool_runs_out(gpt_oss):
    """A window pool below its worst case (a tight budget) preempts instead of hanging."""
    path, _ = gpt_oss
    model = load_shard(path).model
    prompts = prompts_of_lengths([40, 9, 9, 9], seed=8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [greedy_tokens(model, [p], max_tokens=12, block_size=BLOCK)[0] for p in prompts]
    engine = Engine(model, EngineConfig(kv_memory_bytes=2**20, block_size=BLOCK, max_num_seqs=4,
                                        max_num_batched_tokens=16))
    window = engine.block_manager_for(WINDOW)
    # Shrink the window pool to the floor: one sequence's window + one 16-token chunk.
    keep = -(-(WINDOW - 1 + 16) // BLOCK) + 1
    while len(window.free_block_ids) > keep:
        window.free_block_ids.pop()
    window.num_blocks = keep
    tokens = run_stepwise(engine, prompts, params)
    assert engine.take_preempted()
    assert tokens == expected
    assert window.num_free_blocks == window.num_blocks


# ---- pipelines -----------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", [1, 2])  # 1: the first shard has only a sliding layer
def test_two_stage_pipeline_equals_single_engine(gpt_oss, boundary):
    path, _ = gpt_oss
    prompts = prompts_of_lengths([57, 20, 38], seed=10)
    expected = greedy_tokens(load_shard(path).model, prompts, max_tokens=NUM_DECODE_STEPS,
                             block_size=BLOCK, max_num_batched_tokens=16)
    config = EngineConfig(kv_memory_bytes=2**21, block_size=BLOCK, max_num_batched_tokens=16)
    tokens, engines = pipeline_greedy_tokens(path, [(0, boundary), (boundary, 4)],
                                             [config, config], prompts, NUM_DECODE_STEPS)
    assert tokens == expected
    for engine in engines:
        window = engine.block_manager_for(WINDOW)
        assert window.num_free_blocks == window.num_blocks
        assert engine.num_free_blocks == engine.num_total_blocks


# ---- partial rotary ------------------------------------------------------------------------


def test_partial_rotary_factor_read_from_rope_parameters_and_attribute():
    from transformers import AutoConfig

    v5 = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4,
                              partial_rotary_factor=0.5)
    assert getattr(v5, "partial_rotary_factor", None) is None  # moved into rope_parameters
    assert LlamaForCausalLM.make_rotary(v5).rotary_dim == 8
    v4 = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, head_dim=16,
                               max_position_embeddings=64, rope_theta=10000.0,
                               rope_scaling=None, partial_rotary_factor=0.25)
    assert LlamaForCausalLM.make_rotary(v4).rotary_dim == 4
    plain = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4)
    assert LlamaForCausalLM.make_rotary(plain).rotary_dim == 16
