"""The fused decode ops (decode_ops.c) against their torch code, and the one-call decode step
(decode_plan.py) against the torch modules, on tiny packed Llama / Qwen2 / Qwen3 models."""

from __future__ import annotations

import shutil
import weakref

import pytest
import torch
import torch.nn.functional as F

from parallax.models import fused_ops
from parallax.models.attention import AttentionMetadata, decode_attention
from parallax.models.decode_plan import DecodePlan, current_plan
from parallax.models.layers import RMSNorm, RotaryEmbedding
from parallax.models.loader import load_shard
from parallax.models.quant import native
from parallax.models.quant.formats import QT
from parallax.models.quant.loading import set_activation_int8
from parallax.models.quant.packed import native_call_count
from tests.tiny_models import attach_cache, prefill_hidden, save_tiny_model, tiny_config

pytestmark = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed")


@pytest.fixture(params=["best", "generic"])
def variant(request, monkeypatch):
    """The fused ops from this CPU's best build, then from the portable C build."""
    if request.param == "generic":
        monkeypatch.setenv("PARALLAX_NATIVE_KERNELS", "generic")
    else:
        monkeypatch.delenv("PARALLAX_NATIVE_KERNELS", raising=False)
    fused_ops.refresh()
    lib = fused_ops._lib()
    assert lib is not None and (request.param == "best") == (lib.variant != "generic")
    yield lib.variant
    fused_ops.refresh()


def torch_only(fn, *args, **kwargs):
    """Run fn with the fused ops switched off (their torch fallbacks run instead)."""
    saved = fused_ops._lib_cache
    fused_ops._lib_cache = None
    try:
        return fn(*args, **kwargs)
    finally:
        fused_ops._lib_cache = saved


def test_rms_norm_and_silu_gate_equal_torch(variant):
    g = torch.Generator().manual_seed(0)
    for rows, dim in ((1, 576), (7, 100), (33, 64)):
        norm = RMSNorm(dim, eps=1e-5)
        norm.weight.data = torch.randn(dim, generator=g)
        x = torch.randn(rows, dim, generator=g) * 3
        fused = fused_ops.rms_norm(x, norm.weight, norm.eps)
        assert fused is not None
        torch.testing.assert_close(fused, torch_only(norm, x), rtol=1e-5, atol=1e-6)
        gate_up = torch.randn(rows, 2 * dim, generator=g) * 8  # reaches exp's clamped range
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(fused_ops.silu_mul(gate_up), F.silu(gate) * up,
                                   rtol=1e-5, atol=1e-6)


def test_rope_in_place_equals_the_torch_rotation(variant):
    g = torch.Generator().manual_seed(1)
    for head_dim, factor in ((64, 1.0), (80, 0.5)):
        config = tiny_config("llama", max_position_embeddings=64)
        rotary = RotaryEmbedding(config, head_dim, int(head_dim * factor))
        qkv = torch.randn(5, 7, head_dim, generator=g)  # q|k heads first, then two more
        positions = torch.tensor([0, 3, 17, 63, 5])
        expected = rotary.rotate(qkv[:, :5], *rotary.step_tables(positions))
        rotated = qkv.clone()
        assert fused_ops.rope_(rotated[:, :5], positions, rotary.cos, rotary.sin,
                               rotary.rotary_dim)
        torch.testing.assert_close(rotated[:, :5], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(rotated[:, 5:], qkv[:, 5:])  # strided rows: other heads untouched
        with pytest.raises(ValueError, match="out of range"):
            fused_ops.rope_(rotated[:, :5], torch.tensor([0, 1, 2, 64, 4]), rotary.cos,
                            rotary.sin, rotary.rotary_dim)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 80), (8, 1, 32)])
@pytest.mark.parametrize("window,sinks", [(None, False), (5, False), (None, True)])
def test_decode_attention_equals_sdpa(variant, heads, kv_heads, head_dim, window, sinks):
    g = torch.Generator().manual_seed(2)
    k_cache = torch.randn(300, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(300, kv_heads, head_dim, generator=g)
    lens = torch.tensor([1, 70, 129])  # unequal rows; more than one 64-key chunk
    rows = [torch.randperm(300, generator=g)[:n] for n in lens.tolist()]
    table = torch.stack([torch.cat((r, r[-1:].expand(129 - len(r)))) for r in rows])
    q = torch.randn(3, heads + 2, head_dim, generator=g)[:, :heads]  # strided rows, as in qkv
    sink_logits = torch.randn(heads, generator=g) if sinks else None
    fused = fused_ops.decode_attention(q, k_cache, v_cache, table, lens, 0.3, window,
                                       sink_logits)
    meta = AttentionMetadata(slot_mapping=torch.zeros(3, dtype=torch.long), num_decode_tokens=3,
                             decode_slot_table=table, decode_context_lens=lens)
    slots, mask = (meta.decode_window(window) if window else
                   (table, meta.decode_mask(None)))
    expected = decode_attention(q.contiguous(), k_cache, v_cache, slots, mask, 0.3, sink_logits)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)


def test_decode_attention_refuses_slots_and_lengths_out_of_range(variant):
    k_cache = v_cache = torch.zeros(16, 2, 32)
    q = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="out of range"):
        fused_ops.decode_attention(q, k_cache, v_cache, torch.tensor([[3, 16]]),
                                   torch.tensor([2]), 1.0)
    with pytest.raises(ValueError, match="out of range"):
        fused_ops.decode_attention(q, k_cache, v_cache, torch.tensor([[3, 4]]),
                                   torch.tensor([3]), 1.0)
    # bf16 and other devices keep the torch code
    assert fused_ops.decode_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(),
                                      torch.tensor([[3]]), torch.tensor([1]), 1.0) is None


# ------------------------------------------------------------------- the one-call decode step

@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def packed_tiny(request, tmp_path_factory):
    path, _ = save_tiny_model(tmp_path_factory.mktemp("plan"), request.param)
    return load_shard(path, quantize="q8_0").model


def decode_step(model, contexts: list[int], modules: bool) -> torch.Tensor:
    """One decode token for each of len(contexts) sequences whose prompts were prefilled into
    slots [100 * i, 100 * i + n); returns the hidden states. modules: the torch modules (with
    the fused ops off too) instead of the plan."""
    attach_cache(model, num_slots=100 * len(contexts))
    g = torch.Generator().manual_seed(3)
    for i, n in enumerate(contexts):  # each sequence's prompt, then its KV moved to its slots
        prefill_hidden(model, torch.randint(0, 256, (n,), generator=g))
        for layer in model.attention_layers:
            layer.k_cache[100 * i : 100 * i + n] = layer.k_cache[:n].clone()
            layer.v_cache[100 * i : 100 * i + n] = layer.v_cache[:n].clone()
    lens = torch.tensor(contexts) + 1
    table = torch.stack([torch.arange(100 * i, 100 * i + max(lens)) for i in range(len(lens))])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([100 * i + n for i, n in enumerate(contexts)]),
        num_decode_tokens=len(contexts), decode_slot_table=table, decode_context_lens=lens,
        decode_unpadded=len(set(contexts)) == 1)
    ids = torch.randint(0, 256, (len(contexts),), generator=g)
    with torch.inference_mode():
        if modules:
            return torch_only(lambda: model(ids, lens - 1, meta))
        return model(ids, lens - 1, meta)


# 3 rows: the fused kernels; 20 rows: on AVX2 the blocked GEMM inside the plan, for fp32
# activations and for int8 ones of this Q8_0 model (from 16 rows), which the modules take too
# (an int8 kernel on one side only would differ by ~1e-2, far past the tolerance)
BATCHES = {"3-rows": [5, 31, 12], "20-rows": [3 + 7 * i % 40 for i in range(20)]}


@pytest.mark.parametrize("contexts", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("int8", [False, True], ids=["fp32-activations", "int8-activations"])
def test_one_call_decode_step_equals_the_modules(packed_tiny, monkeypatch, int8, contexts):
    model = packed_tiny
    lib = native.kernels()
    if int8 and lib.variant == "generic":
        pytest.skip("the portable build has no int8-activation kernels")
    if len(contexts) >= 16 and lib.gemm_min_rows(QT.Q8_0, int8) is None:
        pytest.skip("this build takes the plan below 16 rows only (no blocked GEMM)")
    set_activation_int8(model, int8)
    try:
        monkeypatch.setenv("PARALLAX_FUSED_DECODE", "0")
        reference = decode_step(model, contexts, modules=True)
        assert current_plan(model) is False  # switched off: the modules ran
        monkeypatch.setenv("PARALLAX_FUSED_DECODE", "1")
        calls = native_call_count()
        fused = decode_step(model, contexts, modules=False)
        assert isinstance(current_plan(model), DecodePlan)
        assert native_call_count() > calls
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
        # the plan wrote the new token's k and v where the modules would have
        slots = [100 * i + n for i, n in enumerate(contexts)]
        fused_k = model.attention_layers[-1].k_cache[slots].clone()
        decode_step(model, contexts, modules=True)
        torch.testing.assert_close(fused_k, model.attention_layers[-1].k_cache[slots],
                                   rtol=1e-4, atol=1e-5)
    finally:
        set_activation_int8(model, False)


def test_one_call_decode_step_refuses_positions_past_the_rope_table(packed_tiny):
    model = packed_tiny
    attach_cache(model, num_slots=1024)
    limit = model.rotary.cos.shape[0]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([limit]), num_decode_tokens=1,
        decode_slot_table=torch.arange(limit + 1)[None], decode_context_lens=torch.tensor([limit + 1]))
    with torch.inference_mode(), pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([1]), torch.tensor([limit]), meta)
    assert isinstance(current_plan(model), DecodePlan)


def test_prefill_steps_and_float_models_keep_the_modules(tmp_path):
    path, _ = save_tiny_model(tmp_path, "llama")
    model = load_shard(path).model  # float weights: no plan
    decode_step(model, [4], modules=False)
    assert current_plan(model) is False


def test_the_plan_lets_an_old_engines_kv_cache_go(packed_tiny):
    """A plan points into the KV caches but does not keep them: a new engine's caches replace
    them (the old ones are freed at once) and the next decode step builds a new plan."""
    model = packed_tiny
    decode_step(model, [4], modules=False)
    plan = current_plan(model)
    assert isinstance(plan, DecodePlan)
    old_cache = weakref.ref(model.attention_layers[0].k_cache)
    attach_cache(model)
    assert old_cache() is None
    decode_step(model, [4], modules=False)
    assert isinstance(current_plan(model), DecodePlan)
    assert current_plan(model) is not plan
