"""MXFP4 dequantization equals transformers' own (bit for bit) on random blocks and scales."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from parallax.models.mxfp4 import FP4_VALUES, dequantize_mxfp4


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
