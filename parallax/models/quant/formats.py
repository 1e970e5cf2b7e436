"""GGUF block layouts and a pure-torch dequantizer for the packed types.

Each quantized row of K values is K / block_size blocks of type_size bytes, laid out as ggml
writes them (the sizes come from the `gguf` package). The torch dequantizer mirrors
`gguf.quants` bit for bit and runs on any device, so it is the always-correct path (CPU without
the native kernel, CUDA) and the reference the native kernel is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from parallax.models.mxfp4 import FP4_VALUES

QT = GGMLQuantizationType
# The types that stay packed in memory (what Q4_K_M / Q5_K_M / Q6_K / Q8_0 files hold, and
# MXFP4: gpt-oss' experts, from GGUF or repacked from its safetensors by parallax.models.mxfp4).
PACKED_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K,
                QT.MXFP4)


def block_size(qtype: QT) -> int:
    """Values per block (32 for the legacy types, 256 for K-quants)."""
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: QT) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[qtype][1]


def row_bytes(qtype: QT, in_features: int) -> int:
    """Bytes of one packed row of in_features values; raises if K does not fill whole blocks."""
    size = block_size(qtype)
    if in_features % size:
        raise ValueError(f"{qtype.name} rows need a multiple of {size} values, got {in_features}")
    return in_features // size * type_size(qtype)


def _f16(data: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [..., 1] fp32 (ggml stores block scales as little-endian fp16)."""
    return data.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2, n]: low nibbles, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """[..., n] bytes -> [..., count, n]: bit i of every byte in row i."""
    shifts = torch.arange(count, dtype=torch.uint8, device=qh.device).view(count, 1)
    return (qh.unsqueeze(-2) >> shifts) & 1


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32]: bit j is value j's high bit."""
    return _bits(qh, 8).transpose(-1, -2).reshape(qh.shape[0], 32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:]).reshape(b.shape[0], 32).float()
    return _f16(b[:, :2]) * (q - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:]).reshape(b.shape[0], 32).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]).reshape(b.shape[0], 32) | (_bits32(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]).reshape(b.shape[0], 32) | (_bits32(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 packed bytes -> 8 six-bit scales and 8 six-bit mins per block."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.float(), mn.float()


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d * scale_j * q - dmin * min_j over 8 sub-blocks of 32 (Q4_K, Q5_K)."""
    sc, mn = k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    out = (d * sc).unsqueeze(-1) * q.float() - (dmin * mn).unsqueeze(-1)
    return out.reshape(b.shape[0], 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _k_affine(b, q)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    low = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _k_affine(b, low | (_bits(b[:, 16:48], 8) << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    low = _nibbles(b[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(4, 1)
    high = ((b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)
    q = ((low | (high << 4)).float() - 32).reshape(-1, 16, 16)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()
    return (scale.unsqueeze(-1) * q).reshape(b.shape[0], 256)


def _mxfp4(b: torch.Tensor) -> torch.Tensor:
    """ggml's MXFP4 block: one E8M0 exponent byte e, then 16 bytes of E2M1 codes (value j in the
    low nibble of byte j, value j + 16 in the high one); value = E2M1 * 2 ** (e - 127).

    Computed as ggml does: the doubled E2M1 value (an integer) times 2 ** (e - 128) made from
    its bits, which is exact and twice as fast as ldexp on every value."""
    e = b[:, :1].to(torch.int32)
    half = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)
    doubled = 2 * torch.tensor(FP4_VALUES, dtype=torch.float32, device=b.device)
    codes = _nibbles(b[:, 1:]).reshape(b.shape[0], 32)
    return doubled[codes.int()] * half


DEQUANTIZERS: dict[QT, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q8_0: _q8_0,
    QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k, QT.MXFP4: _mxfp4,
}


def dequantize_rows(rows: torch.Tensor, qtype: QT) -> torch.Tensor:
    """Packed rows [R, row_bytes] (uint8) -> fp32 [R, K] on the rows' device."""
    num_rows = rows.shape[0]
    blocks = rows.reshape(-1, type_size(qtype))
    return DEQUANTIZERS[qtype](blocks).reshape(num_rows, -1)


def random_blocks(qtype: QT, rows: int, cols: int, seed: int = 0):
    """Valid packed bytes [rows, row_bytes] (numpy uint8) of random weights, for tests and
    benchmarks: gguf's own quantizer for the legacy types; for the K-quants (which gguf cannot
    quantize) random blocks whose fp16 super-block scales are small and finite."""
    import numpy as np
    from gguf import quants

    rng = np.random.default_rng(seed)
    if block_size(qtype) == 32:
        return quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    num_blocks = rows * cols // block_size(qtype)
    blocks = rng.integers(0, 256, (num_blocks, type_size(qtype)), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (num_blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == QT.Q6_K:
        blocks[:, 208:210] = scales[:, :2]  # d sits at the end; the int8 sub-scales stay random
    else:
        blocks[:, 0:4] = scales  # d, dmin
    return blocks.reshape(rows, -1)
