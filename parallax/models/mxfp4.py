"""MXFP4 (OCP microscaling FP4) dequantization for gpt-oss checkpoints.

A quantized weight [*, R, C] is stored as
- `*_blocks`: uint8 [*, R, C/32, 16]: 32 FP4 (E2M1) codes per group, two per byte, the low
  nibble first;
- `*_scales`: uint8 [*, R, C/32]: one shared power-of-two exponent per group, biased by 127.
value = E2M1(code) * 2 ** (scale - 127).

`repack_mxfp4` turns that into ggml's MXFP4 blocks (the GGUF type, 17 bytes per 32 values, the
same byte count), which parallax.models.quant multiplies in place: gpt-oss' experts stay MXFP4
in memory. `dequantize_mxfp4` is the float path and the reference.
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
GGML_BLOCK_BYTES = 1 + GROUP_SIZE // 2  # ggml's block_mxfp4: exponent byte, then 16 code bytes


def _check_pair(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP_SIZE // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair: "
            "expected blocks [..., G, 16] and scales [..., G]"
        )


def repack_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [*, R, G, 16] + scales [*, R, G] (uint8) -> ggml MXFP4 rows [*, R, G * 17] uint8.

    A ggml block is the exponent byte, then 16 bytes holding value j in the low nibble of byte
    j and value j + 16 in the high one (the checkpoint pairs values 2i, 2i + 1 in byte i
    instead). Exponents and codes are unchanged, so the values are bit for bit the same.
    """
    _check_pair(blocks, scales)
    *prefix, groups, num_bytes = blocks.shape
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # [..., G, 32]
    qs = codes[..., :num_bytes] | (codes[..., num_bytes:] << 4)  # [..., G, 16]
    packed = torch.cat((scales.unsqueeze(-1).to(torch.uint8), qs.to(torch.uint8)), dim=-1)
    return packed.reshape(*prefix, groups * GGML_BLOCK_BYTES)


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
    _check_pair(blocks, scales)
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


def save_random_mxfp4_checkpoint(hf_model, path: str, seed: int = 0,
                                 exponents: tuple[int, int] = (118, 124)) -> None:
    """For tests and benchmarks: give a transformers gpt-oss model random MXFP4 experts and save
    it to `path` the way the published checkpoints are (`*_blocks` + `*_scales` in place of the
    float expert weights). The model's experts are set to their dequantization by transformers'
    own function, so it computes what the checkpoint holds. Exponents are drawn from
    [exponents[0], exponents[1]) (118-124: magnitudes near a random init's)."""
    import os

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(seed)
    packed = {}
    for name, param in hf_model.named_parameters():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        experts, fan_in, fan_out = param.shape  # transformers' [E, in, out]
        blocks = torch.randint(0, 256, (experts, fan_out, fan_in // GROUP_SIZE, 16),
                               dtype=torch.uint8, generator=generator)
        scales = torch.randint(*exponents, (experts, fan_out, fan_in // GROUP_SIZE),
                               dtype=torch.uint8, generator=generator)
        with torch.no_grad():
            param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=param.dtype))
        packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
    hf_model.save_pretrained(path, safe_serialization=True)
    file = os.path.join(path, "model.safetensors")
    tensors = {name: tensor for name, tensor in load_file(file).items()
               if f"{name}_blocks" not in packed}
    save_file({**tensors, **packed}, file, metadata={"format": "pt"})
