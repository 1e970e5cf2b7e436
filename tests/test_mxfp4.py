"""MXFP4 dequantization equals transformers' own (bit for bit) on random blocks and scales; the
packed path (ggml's MXFP4 blocks, native kernel or torch) equals dequantize + fp32 matmul."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants
from test_quant_kernels import (  # noqa: F401 (kernel_path: a fixture)
    PATHS,
    TORCH_TOLERANCE,
    kernel_path,
    relative_error,
)
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from parallax.models.mxfp4 import FP4_VALUES, dequantize_mxfp4, repack_mxfp4
from parallax.models.quant import native
from parallax.models.quant.formats import QT, dequantize_rows
from parallax.models.quant.packed import GEMM_MIN_ROWS, PackedWeight, native_for, packed_matmul


def random_packed(experts: int, rows: int, groups: int, scale_range=(0, 256), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8,
                           generator=generator)
    scales = torch.randint(*scale_range, (experts, rows, groups), dtype=torch.uint8,
                           generator=generator)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_range", [(0, 256), (112, 136)])
def test_equals_transformers_dequantization(dtype, scale_range):
    blocks, scales = random_packed(4, 24, 3, scale_range)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
    ours = dequantize_mxfp4(blocks, scales, dtype)  # [E, out, in]
    assert ours.dtype == dtype and ours.shape == (4, 24, 96)
    # torch.equal treats NaN as unequal; the full exponent range makes inf but never NaN
    assert torch.equal(ours.transpose(1, 2), expected)


def test_chunking_does_not_change_the_result():
    blocks, scales = random_packed(3, 10, 4, seed=1)
    whole = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32, rows_per_chunk=7), whole)


def test_nibble_order_and_scale():
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[..., 0] = 0x2F  # low nibble 0xF = -6.0 (element 0), high nibble 0x2 = 1.0 (element 1)
    scales = torch.full((1, 1, 1), 127 + 3, dtype=torch.uint8)  # x 2**3
    values = dequantize_mxfp4(blocks, scales, torch.float32)[0, 0]
    assert values[:2].tolist() == [FP4_VALUES[0xF] * 8, FP4_VALUES[0x2] * 8] == [-48.0, 8.0]
    assert values[2:].abs().sum() == 0


def test_mismatched_shapes_raise():
    blocks, scales = random_packed(1, 4, 2)
    with pytest.raises(ValueError, match="do not pair"):
        dequantize_mxfp4(blocks, scales[..., :1])


# ---- packed: repacked to ggml's MXFP4 blocks and multiplied in place ----------------------------


@pytest.mark.parametrize("scale_range", [(0, 256), (112, 136)])
def test_repacked_blocks_dequantize_to_the_same_values(scale_range):
    """ggml's layout holds the same values: our torch dequantizer, gguf's numpy one and the
    checkpoint-layout dequantizer agree bit for bit, over the full exponent range."""
    blocks, scales = random_packed(3, 10, 4, scale_range, seed=2)
    rows = repack_mxfp4(blocks, scales)
    assert rows.shape == (3, 10, 4 * 17) and rows.dtype == torch.uint8  # same bytes: 16 + 1
    expected = dequantize_mxfp4(blocks, scales, torch.float32).reshape(30, 128)
    flat = rows.reshape(30, -1)
    assert torch.equal(dequantize_rows(flat, QT.MXFP4), expected)
    with np.errstate(over="ignore"):
        assert np.array_equal(quants.dequantize(flat.numpy(), QT.MXFP4), expected.numpy())


# (out, in): odd expert shapes; out not a multiple of the native row chunk (16), in = 3 blocks
SHAPES = [(45, 96), (16, 32), (130, 160)]


@pytest.mark.parametrize("kernel_path", PATHS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_matmul_equals_dequantize_then_fp32_matmul(shape, kernel_path):  # noqa: F811
    out_features, in_features = shape
    blocks, scales = random_packed(1, out_features, in_features // 32, (118, 130), seed=3)
    weight = PackedWeight(repack_mxfp4(blocks, scales)[0], QT.MXFP4, in_features)
    lib = native.kernels()
    assert native_for(lib, weight) == (kernel_path is not None)
    reference = dequantize_mxfp4(blocks, scales, torch.float32)[0]  # [out, in]
    generator = torch.Generator().manual_seed(4)
    for batch in (1, 7, GEMM_MIN_ROWS, 64):  # fused kernel, then tiled GEMM
        x = torch.randn(batch, in_features, generator=generator)
        calls_before = 0 if kernel_path is None else kernel_path.call_count()
        got = packed_matmul(x, weight, lib if native_for(lib, weight) else None)
        if kernel_path is not None:
            assert kernel_path.call_count() > calls_before, "the native kernel did not run"
        assert got.shape == (batch, out_features) and got.dtype == torch.float32
        error = relative_error(got, (x @ reference.T).numpy())
        assert error < TORCH_TOLERANCE, f"batch {batch}: relative error {error:.2e}"


@pytest.mark.parametrize("kernel_path", PATHS[:1] + ["torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_experts_equal_dequantized_experts(kernel_path, dtype):  # noqa: F811
    """FusedExperts holding MXFP4 rows computes what it computes on the dequantized weights;
    only the chosen experts' rows are read (the others are poisoned)."""
    from parallax.models.moe import FusedExperts

    num_experts, hidden, inter = 6, 64, 96
    torch.manual_seed(0)
    dense = FusedExperts(num_experts, hidden, inter, bias=True)  # fp32 reference
    packed = FusedExperts(num_experts, hidden, inter, bias=True).to(dtype)
    for proj in ("gate_up_proj", "down_proj"):
        packed.set_weight_type(proj, QT.MXFP4)
        rows, cols = packed.shapes[proj]
        blocks, scales = random_packed(num_experts, rows, cols // 32, (120, 128), seed=5)
        getattr(packed, f"{proj}_packed").data.copy_(repack_mxfp4(blocks, scales))
        getattr(dense, proj).data.copy_(dequantize_mxfp4(blocks, scales, torch.float32))
        bias = getattr(packed, f"{proj}_bias")  # biases stay in the model's dtype
        bias.data.normal_()
        getattr(dense, f"{proj}_bias").data.copy_(bias.data)
    assert packed.gate_up_proj is None and packed.down_proj is None
    expected_path = "torch" if kernel_path is None else f"native-{kernel_path.variant}"
    assert packed.kernel_paths() == [f"MXFP4:{expected_path}"] * 2
    packed.gate_up_proj_packed.data[5] = 0xFF  # expert 5 is never chosen: NaN if it were read
    packed.down_proj_packed.data[5] = 0xFF
    for tokens in (1, 7, 64):
        x = torch.randn(tokens, hidden).to(dtype)
        ids = torch.randint(0, 5, (tokens, 2))
        weights = torch.rand(tokens, 2).to(dtype)
        with torch.no_grad():
            got, expected = packed(x, ids, weights), dense(x.float(), ids, weights.float())
        assert got.dtype == dtype and torch.isfinite(got).all()
        tolerance = TORCH_TOLERANCE * 10 if dtype == torch.float32 else 2e-2
        error = relative_error(got.float(), expected.numpy())
        assert error < tolerance, f"{tokens} tokens: relative error {error:.2e}"


@pytest.mark.parametrize("kernel_path", PATHS[:1], indirect=True)
def test_packed_experts_take_int8_activations_when_the_node_asks(kernel_path):  # noqa: F811
    """set_activation_int8 reaches packed MoE experts: decode-sized rows go through the int8
    kernel ("-int8" in the paths) and stay within int8 rounding of the fp32-activation result."""
    from parallax.models.moe import FusedExperts
    from parallax.models.quant.loading import set_activation_int8

    if not kernel_path.supports_q8(QT.MXFP4, 64):
        pytest.skip(f"the {kernel_path.variant} build has no int8-activation kernels")
    experts = FusedExperts(4, 64, 96)
    for proj in ("gate_up_proj", "down_proj"):
        experts.set_weight_type(proj, QT.MXFP4)
        rows, cols = experts.shapes[proj]
        blocks, scales = random_packed(4, rows, cols // 32, (120, 128), seed=6)
        getattr(experts, f"{proj}_packed").data.copy_(repack_mxfp4(blocks, scales))
    x, ids, weights = torch.randn(3, 64), torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2)
    with torch.no_grad():
        fp32 = experts(x, ids, weights)
        assert set_activation_int8(experts, True) == 2
        assert experts.kernel_paths() == [f"MXFP4:native-{kernel_path.variant}-int8"] * 2
        int8 = experts(x, ids, weights)
    assert not torch.equal(int8, fp32)  # the int8 kernel ran: the activations were rounded
    assert relative_error(int8, fp32.numpy()) < 0.02
    assert set_activation_int8(experts, False) == 0
