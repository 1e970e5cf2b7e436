"""MXFP4 (OCP microscaling FP4) dequantization for gpt-oss checkpoints.

A quantized weight [*, R, C] is stored as
- `*_blocks`: uint8 [*, R, C/32, 16]: 32 FP4 (E2M1) codes per group, two per byte, the low
  nibble first;
- `*_scales`: uint8 [*, R, C/32]: one shared power-of-two exponent per group, biased by 127.
value = E2M1(code) * 2 ** (scale - 127).
"""

from __future__ import annotations

import torch

# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)
GROUP_SIZE = 32
SCALE_BIAS = 127


def dequantize_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    rows_per_chunk: int = 1 << 16,
) -> torch.Tensor:
    """blocks [*, R, G, 16] uint8 + scales [*, R, G] uint8 -> weights [*, R, G*32] in dtype.

    The rows keep the checkpoint's orientation ([out, in] for gpt-oss' gate_up and down).
    Values are computed in fp32 (exact there) and cast once; work runs in chunks of
    rows_per_chunk (row, group) pairs so a 120B layer never needs its fp32 copy at once.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP_SIZE // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair: "
            "expected blocks [..., G, 16] and scales [..., G]"
        )
    *prefix, groups, num_bytes = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = blocks.reshape(-1, num_bytes).to(torch.uint8)  # [N, 16], N = prod(prefix) * G
    exponents = scales.reshape(-1, 1).to(torch.int32) - SCALE_BIAS  # [N, 1]
    out = torch.empty(codes.shape[0], num_bytes * 2, dtype=dtype, device=blocks.device)
    for start in range(0, codes.shape[0], rows_per_chunk):
        chunk = codes[start : start + rows_per_chunk]
        # low nibble is the even element, high nibble the odd one: [n, 16, 2] -> [n, 32]
        values = torch.stack((lut[(chunk & 0x0F).int()], lut[(chunk >> 4).int()]), dim=-1)
        values = torch.ldexp(values.flatten(1), exponents[start : start + rows_per_chunk])
        out[start : start + rows_per_chunk] = values
    return out.view(*prefix, groups * num_bytes * 2)  # [*, R, G*32]
