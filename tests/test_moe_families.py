"""Qwen3-MoE, GPT-OSS and MiniMax-M2 against transformers 5.24 on tiny random weights.

Each family is a transformers model built from its own config class (3-4 layers, 8 experts,
hidden 64), saved with save_pretrained as safetensors and loaded through load_shard. Logits are
compared row by row: prefill, then 16 decode steps on the paged KV cache, for one request and
for four requests of different lengths batched together (and with chunked prefill). The
reference is transformers' full-sequence forward over prompt + our generated tokens (a causal
model's logits at position p depend only on tokens <= p, so one forward checks every step).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.model_runner import kv_bytes_per_token
from parallax.engine.sampling_params import SamplingParams
from parallax.models import attention
from parallax.models.attention import AttentionMetadata, PrefillSpan
from parallax.models.loader import load_shard
from parallax.models.moe import FusedExperts, silu_and_mul
from parallax.models.mxfp4 import save_random_mxfp4_checkpoint
from parallax.models.quant import native, native_call_count
from parallax.models.quant.formats import QT
from parallax.models.quant.loading import kernel_summary
from parallax.models.sizing import estimate_layer_bytes, formula_param_counts, shard_bytes

# fp32 on both sides; the differences are summation order only (observed max ~3e-7 on logits
# of magnitude ~0.5-1).
LOGITS_ATOL = 2e-5
LOGITS_RTOL = 1e-4
NUM_DECODE_STEPS = 16
VOCAB = 256

BASE = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
    max_position_embeddings=512, rms_norm_eps=1e-5, num_experts_per_tok=2,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
CONFIGS = {
    # layer 1 is dense (mlp_only_layers), the others sparse with renormalised top-k
    "qwen3_moe": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                      num_experts=8, norm_topk_prob=True, mlp_only_layers=[1]),
    # sliding / full / sliding / full with a window of 8; YaRN; a low clamp so it bites
    "gpt_oss": dict(num_hidden_layers=4, intermediate_size=32, num_local_experts=8,
                    sliding_window=8, swiglu_limit=0.15,
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0,
                                         beta_fast=32.0, beta_slow=1.0, truncate=False,
                                         original_max_position_embeddings=128)),
    # partial RoPE: rotary_dim 8 of head_dim 16
    "minimax_m2": dict(num_hidden_layers=3, intermediate_size=32, num_local_experts=8,
                       rotary_dim=8),
}
SPLITS = {
    "qwen3_moe": [[(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]],
    "gpt_oss": [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]],
    "minimax_m2": [[(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)]],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads; on a busy CPU idle OpenMP workers spinning
    for their turn make each step 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**BASE, **CONFIGS[model_type], **overrides})


def build_hf_model(model_type: str, seed: int = 0, **overrides):
    """Random transformers model; norms, biases, sinks and router correction biases are
    perturbed away from their 1 / 0 init so that they are tested too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("norm.weight", "bias", "sinks")):
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    model_type = request.param
    hf_model = build_hf_model(model_type)
    path = tmp_path_factory.mktemp(model_type)
    hf_model.save_pretrained(path, safe_serialization=True)
    return model_type, str(path), hf_model


def prompts_of_lengths(lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def engine_logits(model, prompts, **config) -> tuple[list[torch.Tensor], int]:
    """Greedy-run prompts through one Engine, all added at once, recording every logits row.

    Returns (per request [1 + 16, vocab] logits in step order, number of engine steps).
    """
    engine = Engine(model, EngineConfig(kv_memory_bytes=4 * 2**20, **config))
    params = SamplingParams(temperature=0, max_tokens=NUM_DECODE_STEPS + 1, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    recorded: list[torch.Tensor] = []
    real_compute_logits = model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        recorded.append(real_compute_logits(hidden))
        return recorded[-1]

    model.compute_logits = recording
    rows: dict[str, list[torch.Tensor]] = {str(i): [] for i in range(len(prompts))}
    try:
        while engine.has_work():
            recorded.clear()
            sampled = [o for o in engine.step() if o.token_id is not None]
            for index, output in enumerate(sampled):  # sampled rows follow the logits rows
                rows[output.request_id].append(recorded[0][index])
    finally:
        del model.compute_logits
    return [torch.stack(rows[str(i)]) for i in range(len(prompts))], engine.num_steps


@torch.no_grad()
def reference_logits(hf_model, prompt: list[int], ours: torch.Tensor) -> torch.Tensor:
    """transformers' logits at the positions where we sampled (prompt end + each decode)."""
    generated = ours.argmax(-1).tolist()  # our greedy tokens, fed back as the engine did
    sequence = torch.tensor([prompt + generated[:-1]])
    return hf_model(sequence).logits[0, len(prompt) - 1 :]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


def attach_cache(model, num_slots: int = 512) -> None:
    for layer in model.attention_layers:
        shape = (num_slots, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(shape)
        layer.v_cache = torch.zeros(shape)


def prefill_meta(num_tokens: int) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=torch.arange(num_tokens),
                             prefills=[PrefillSpan(0, num_tokens, num_tokens, None)])


def decode_meta(position: int) -> AttentionMetadata:
    """One sequence in slots 0..position, decoding the token at `position`."""
    return AttentionMetadata(
        slot_mapping=torch.tensor([position]), num_decode_tokens=1,
        decode_slot_table=torch.arange(position + 1)[None],
        decode_context_lens=torch.tensor([position + 1]),
    )


# ---- correctness against transformers ---------------------------------------------------------


def test_prefill_logits_match_transformers(family):
    _, path, hf_model = family
    shard = load_shard(path).model
    attach_cache(shard)
    ids = torch.tensor(prompts_of_lengths([29], seed=7)[0])
    with torch.inference_mode():
        ours = shard.compute_logits(shard(ids, torch.arange(len(ids)), prefill_meta(len(ids))))
    with torch.no_grad():
        ref = hf_model(ids[None]).logits[0]
    assert_logits_close(ours, ref)


def test_prefill_and_16_decode_steps_batch_1(family):
    _, path, hf_model = family
    shard = load_shard(path).model
    prompt = prompts_of_lengths([13], seed=3)[0]
    (ours,), num_steps = engine_logits(shard, [prompt])
    assert ours.shape == (NUM_DECODE_STEPS + 1, VOCAB) and num_steps == NUM_DECODE_STEPS + 1
    assert_logits_close(ours, reference_logits(hf_model, prompt, ours))


def test_four_requests_of_different_lengths_in_one_batch(family):
    _, path, hf_model = family
    shard = load_shard(path).model
    prompts = prompts_of_lengths([3, 9, 20, 31])
    ours, num_steps = engine_logits(shard, prompts, block_size=4)
    assert num_steps == NUM_DECODE_STEPS + 1  # all four prefilled together, then decoded together
    for prompt, logits in zip(prompts, ours, strict=True):
        assert_logits_close(logits, reference_logits(hf_model, prompt, logits))


def test_chunked_prefill_mixed_with_decodes(family):
    """An 8-token step budget splits prompts into chunks that attend to cached context (the
    sliding-window path for gpt-oss) and runs them next to other requests' decodes."""
    _, path, hf_model = family
    shard = load_shard(path).model
    prompts = prompts_of_lengths([2, 19, 27], seed=5)
    ours, _ = engine_logits(shard, prompts, block_size=4, max_num_batched_tokens=8)
    for prompt, logits in zip(prompts, ours, strict=True):
        assert_logits_close(logits, reference_logits(hf_model, prompt, logits))


def test_bfloat16_shard_stays_near_the_fp32_reference(family):
    """bf16 weights and KV cache: every dtype seam (fp32 router, sinks, norms) holds. The error
    is bf16 rounding, mean ~1e-3; a rare top-k flip moves single rows by up to ~0.2
    (transformers' own bf16 model does the same), hence a mean bound and a loose max."""
    _, path, hf_model = family
    shard = load_shard(path, dtype=torch.bfloat16).model
    prompts = prompts_of_lengths([5, 17], seed=8)
    ours, _ = engine_logits(shard, prompts, dtype=torch.bfloat16)
    for prompt, logits in zip(prompts, ours, strict=True):
        error = (logits - reference_logits(hf_model, prompt, logits)).abs()
        assert error.mean() < 0.01 and error.max() < 0.5


# ---- sharding -----------------------------------------------------------------------------------


@torch.inference_mode()
def run_chain(parts, ids: torch.Tensor, num_decode: int) -> torch.Tensor:
    """Prefill ids then greedy-decode through chained shards; returns all logits rows."""
    for part in parts:
        attach_cache(part)
    rows, inputs, positions, meta = [], ids, torch.arange(len(ids)), prefill_meta(len(ids))
    for _ in range(num_decode + 1):
        hidden = inputs
        for part in parts:
            hidden = part(hidden, positions, meta)
        logits = parts[-1].compute_logits(hidden[-1:])
        rows.append(logits[0])
        position = int(positions[-1]) + 1
        inputs, positions = logits.argmax(-1), torch.tensor([position])
        meta = decode_meta(position)
    return torch.stack(rows)


def test_shards_chained_equal_full_model(family):
    model_type, path, _ = family
    ids = torch.tensor(prompts_of_lengths([21], seed=11)[0])
    full = run_chain([load_shard(path).model], ids, num_decode=6)
    for split in SPLITS[model_type]:
        shards = [load_shard(path, a, b) for a, b in split]
        chained = run_chain([s.model for s in shards], ids, num_decode=6)
        torch.testing.assert_close(chained, full, atol=1e-5, rtol=0)
        for shard, (start, end) in zip(shards, split, strict=True):  # only its own layers
            layers = {int(n.split(".")[2]) for n in shard.read_log.tensor_names
                      if n.startswith("model.layers.")}
            assert layers == set(range(start, end))


# ---- MXFP4 checkpoints --------------------------------------------------------------------------


def save_mxfp4_checkpoint(hf_model, path, quantization_config: bool = False) -> None:
    """hf_model's checkpoint with random MXFP4 experts (as published: `*_blocks` + `*_scales`
    instead of the float expert weights; hf_model's experts become their dequantization); with
    `quantization_config`, config.json says MXFP4 too, as gpt-oss' own does."""
    save_random_mxfp4_checkpoint(hf_model, str(path))
    if quantization_config:
        add_quantization_config(path)


def add_quantization_config(path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))


def assert_experts_packed(model, num_experts: int) -> None:
    """Every layer's experts are MXFP4 rows (4.25 bits a value) and no float tensor of an
    expert weight's size exists anywhere in the model."""
    float_shapes = set()
    for layer in model.layers:
        experts = layer.mlp.experts
        assert experts.gate_up_proj is None and experts.down_proj is None
        for proj, (rows, cols) in experts.shapes.items():
            assert experts.quant_types[proj] == QT.MXFP4
            data = getattr(experts, f"{proj}_packed")
            assert data.dtype == torch.uint8 and data.shape == (num_experts, rows, cols // 32 * 17)
            float_shapes.add((num_experts, rows, cols))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            assert tuple(tensor.shape) not in float_shapes, f"{name} is a float expert copy"


def test_gpt_oss_mxfp4_checkpoint_matches_transformers(tmp_path, monkeypatch):
    """Experts stay MXFP4 (the checkpoint's names decide: this config does not say) and the
    engine's logits still equal transformers' on the dequantized experts."""
    from parallax.models import gpt_oss

    def no_float_copy(*args, **kwargs):
        raise AssertionError("MXFP4 experts were dequantized at load")

    monkeypatch.setattr(gpt_oss, "dequantize_mxfp4", no_float_copy)
    hf_model = build_hf_model("gpt_oss", seed=2)
    save_mxfp4_checkpoint(hf_model, tmp_path)
    shard = load_shard(str(tmp_path))
    assert any(name.endswith("_blocks") for name in shard.read_log.tensor_names)
    assert_experts_packed(shard.model, CONFIGS["gpt_oss"]["num_local_experts"])
    lib = native.kernels()
    assert kernel_summary(shard.model) == {"mxfp4": lib.variant if lib else "torch"}
    calls_before = native_call_count()
    prompt = prompts_of_lengths([12], seed=4)[0]
    (ours,), _ = engine_logits(shard.model, [prompt])
    if lib is not None:
        assert native_call_count() > calls_before, "the native MXFP4 kernel did not run"
    assert_logits_close(ours, reference_logits(hf_model, prompt, ours))


def test_gpt_oss_mxfp4_sizing_counts_packed_bytes(tmp_path):
    """A config that says MXFP4 is sized packed, and a bf16 shard holds exactly that: uint8
    expert rows, every other tensor (expert biases included) in bf16."""
    save_mxfp4_checkpoint(build_hf_model("gpt_oss", seed=2), tmp_path, quantization_config=True)
    shard = load_shard(str(tmp_path), dtype=torch.bfloat16)
    model = shard.model
    assert_experts_packed(model, CONFIGS["gpt_oss"]["num_local_experts"])
    dtypes = {p.dtype for name, p in model.named_parameters() if not name.endswith("_packed")}
    assert dtypes == {torch.bfloat16}
    layer, embedding, lm_head, _ = estimate_layer_bytes(shard.config, dtype_bytes=2)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert layer * shard.config.num_hidden_layers + embedding + lm_head == held
    float_layer, _, _, _ = estimate_layer_bytes(tiny_config("gpt_oss"), dtype_bytes=2)
    assert layer < float_layer / 2
    tail = load_shard(str(tmp_path), 2, 4, dtype=torch.bfloat16)  # a pipeline's last stage
    assert_experts_packed(tail.model, CONFIGS["gpt_oss"]["num_local_experts"])
    held = sum(p.numel() * p.element_size() for p in tail.model.parameters())
    assert held == shard_bytes(tail.source, tail.config, 2, 4, dtype_bytes=2)


def test_gpt_oss_float_experts_under_an_mxfp4_config_load_as_float(tmp_path):
    """The checkpoint's tensors decide the layout: float experts load as float even where
    config.json (kept from an MXFP4 checkpoint) says MXFP4."""
    hf_model = build_hf_model("gpt_oss", seed=2, num_hidden_layers=2)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    add_quantization_config(tmp_path)
    model = load_shard(str(tmp_path)).model
    assert all(not layer.mlp.experts.quant_types for layer in model.layers)
    attach_cache(model)
    ids = torch.tensor(prompts_of_lengths([9], seed=5)[0])
    with torch.inference_mode():
        ours = model.compute_logits(model(ids, torch.arange(len(ids)), prefill_meta(len(ids))))
    with torch.no_grad():
        assert_logits_close(ours, hf_model(ids[None]).logits[0])


# ---- pieces -------------------------------------------------------------------------------------


def test_grouped_experts_equal_per_token_loop():
    torch.manual_seed(0)
    experts = FusedExperts(num_experts=6, hidden_size=16, intermediate_size=8)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_()
    x = torch.randn(11, 16)
    ids = torch.randint(0, 5, (11, 3))  # expert 5 never chosen
    weights = torch.rand(11, 3)
    expected = torch.zeros_like(x)
    for t in range(11):
        for k in range(3):
            e = int(ids[t, k])
            h = silu_and_mul(x[t] @ experts.gate_up_proj[e].T)
            expected[t] += weights[t, k] * (h @ experts.down_proj[e].T)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, ids, weights), expected, atol=1e-4, rtol=1e-5)


def test_sliding_layers_never_read_keys_outside_their_window(tmp_path):
    """Poison every cache slot that fell out of the window: gpt-oss' sliding layers ignore
    them (their full-attention layers get their own clean copy)."""
    hf_model = build_hf_model("gpt_oss", num_hidden_layers=1, layer_types=["sliding_attention"])
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    shard = load_shard(str(tmp_path)).model
    attach_cache(shard)
    ids = torch.tensor(prompts_of_lengths([20], seed=9)[0])
    with torch.inference_mode():
        shard(ids, torch.arange(20), prefill_meta(20))
        clean = shard(torch.tensor([3]), torch.tensor([20]), decode_meta(20))
        layer = shard.attention_layers[0]
        layer.k_cache[: 20 - 7] = float("nan")  # window 8: keys 13..20 stay visible
        layer.v_cache[: 20 - 7] = float("nan")
        poisoned = shard(torch.tensor([3]), torch.tensor([20]), decode_meta(20))
        chunk = AttentionMetadata(slot_mapping=torch.tensor([21, 22]),
                                  prefills=[PrefillSpan(0, 2, 23, torch.arange(23))])
        chunked = shard(torch.tensor([4, 5]), torch.tensor([21, 22]), chunk)
    torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)
    assert torch.isfinite(chunked).all()


@pytest.mark.parametrize("bias_bytes", [attention.SINK_BIAS_BYTES, 1])
def test_attention_sinks_equal_explicit_softmax(bias_bytes, monkeypatch):
    """The sink path (extra zero key, per-head bias) equals softmax([scores, sink]) @ [V, 0],
    also when the per-head bias is built a query row at a time."""
    monkeypatch.setattr(attention, "SINK_BIAS_BYTES", bias_bytes)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    sinks = torch.randn(4)
    mask = attention.causal_mask(9, 9, "cpu", sliding_window=4)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(2, 3) * 0.3  # [1, H, q, k]
    scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat((scores, sinks.view(1, 4, 1, 1).expand(1, 4, 9, 1)), dim=-1)
    expected = logits.softmax(-1)[..., :-1] @ v.repeat_interleave(2, dim=1)
    ours = attention.attend(q, k, v, mask, 0.3, sinks)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", [*CONFIGS, "llama"])
def test_layer_bytes_count_every_parameter(model_type, tmp_path):
    if model_type == "llama":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    else:
        build_hf_model(model_type, mlp_only_layers=[]).save_pretrained(tmp_path)
    shard = load_shard(str(tmp_path))
    config, model = shard.config, shard.model
    layer, embedding, lm_head, kv = estimate_layer_bytes(config, dtype_bytes=4)
    total = sum(p.numel() * 4 for p in model.parameters())
    assert layer * config.num_hidden_layers + embedding + lm_head == total
    assert kv * config.num_hidden_layers == kv_bytes_per_token(model, torch.float32)
    # the config-only formula (for unregistered families) lands close to the exact count
    approx_layer, _, _ = formula_param_counts(config)
    assert abs(approx_layer * 4 - layer) / layer < 0.02
    # bf16 halves everything
    assert estimate_layer_bytes(config, dtype_bytes=2)[0] * 2 == layer


def test_layer_bytes_of_published_configs_count_all_experts():
    """gpt-oss-20b: 24 layers of 32 experts, ~21B parameters in all."""
    config = tiny_config("gpt_oss", hidden_size=2880, intermediate_size=2880, head_dim=64,
                         num_attention_heads=64, num_key_value_heads=8, num_local_experts=32,
                         num_experts_per_tok=4, num_hidden_layers=24, vocab_size=201088,
                         max_position_embeddings=4096)
    layer, embedding, lm_head, kv = estimate_layer_bytes(config, dtype_bytes=2)
    total_params = (24 * layer + embedding + lm_head) / 2
    assert 20.5e9 < total_params < 21.5e9
    assert kv == 2 * 8 * 64 * 2
    # as published, MXFP4 experts (kept packed): about the checkpoint's 13.8 GB, not 42 GB
    config.quantization_config = {"quant_method": "mxfp4"}
    layer, embedding, lm_head, _ = estimate_layer_bytes(config, dtype_bytes=2)
    assert 13.5e9 < 24 * layer + embedding + lm_head < 14e9
