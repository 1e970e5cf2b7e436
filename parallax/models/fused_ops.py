"""Fused fp32 CPU ops of the decode step (decode_ops.c): RMSNorm, rope, SiLU gate, attention.

Each function returns None where the native op does not apply (no native library, another
device or dtype, an unsupported shape), and its caller then runs its own torch code, which
stays the reference: tests compare the two on the same inputs. At decode sizes the torch ops
cost more in dispatch than in arithmetic (SmolLM2 spent ~18 ms of a 45 ms token in them), so
one native call replaces each group. `PARALLAX_NATIVE_KERNELS=0` turns these off with the
packed-matmul kernels.
"""

from __future__ import annotations

import logging

import torch

from parallax.models.quant import native

logger = logging.getLogger(__name__)

MAX_GROUP = 64  # query heads per KV head decode_ops.c accepts
MAX_HEAD_DIM = 512


_UNRESOLVED = object()
_lib_cache: object = _UNRESOLVED


def refresh() -> None:
    """Resolve the library again (after changing PARALLAX_NATIVE_KERNELS)."""
    global _lib_cache
    _lib_cache = _UNRESOLVED


def _lib() -> native.NativeKernels | None:
    """native.kernels(), resolved once (resolving reads /proc/cpuinfo: far too slow for every
    op; even one environment lookup per op was a measurable share of a decode step)."""
    global _lib_cache
    if _lib_cache is _UNRESOLVED:
        lib = native.kernels()
        logger.info("decode ops (norm, rope, SiLU gate, paged decode attention): %s",
                    f"native-{lib.variant}" if lib is not None else "torch")
        _lib_cache = lib
    return _lib_cache


def _fp32_cpu(x: torch.Tensor) -> bool:
    return x.dtype is torch.float32 and x.is_cpu


def _check(status: int, name: str) -> None:
    if status != 0:
        raise ValueError(f"native {name} refused its arguments (a position or cache slot out "
                         "of range)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, or None (use torch)."""
    if not (_fp32_cpu(x) and _fp32_cpu(weight)) or (lib := _lib()) is None:
        return None
    x = x.contiguous()
    dim = x.shape[-1]
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps,
                 torch.get_num_threads())
    return out


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          rotary_dim: int) -> bool:
    """Rotate x [T, heads, D] in place (rotate-half layout, first rotary_dim channels) by the
    [max_pos, rotary_dim / 2] tables at positions [T]; False (nothing done) where the native op
    does not apply. Heads must be contiguous within a token; tokens may be strided."""
    if (not (_fp32_cpu(x) and _fp32_cpu(cos) and _fp32_cpu(sin))
            or positions.dtype is not torch.long or not positions.is_cpu or x.stride(2) != 1
            or x.stride(1) != x.shape[2] or not cos.is_contiguous() or not sin.is_contiguous()
            or (lib := _lib()) is None):
        return False
    positions = positions.contiguous()
    _check(lib.rope(x.data_ptr(), x.shape[0], x.stride(0), x.shape[1], x.shape[2], rotary_dim,
                    positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[0]), "rope")
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for rows [gate | up], or None (use torch)."""
    if not _fp32_cpu(gate_up) or (lib := _lib()) is None:
        return None
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter,
                 torch.get_num_threads())
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     table: torch.Tensor, lens: torch.Tensor, scale: float,
                     window: int | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor | None:
    """One query per row from the paged cache: q [B, H, D] (rows may be strided) against row
    b's keys [max(0, len_b - window), len_b) at slots table[b, :len_b]; caches [S, KVH, D];
    sinks: None or [H] extra logits. Returns [B, H, D], or None (use torch)."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if (not (_fp32_cpu(q) and _fp32_cpu(k_cache) and _fp32_cpu(v_cache)) or heads % kv_heads
            or heads // kv_heads > MAX_GROUP or head_dim > MAX_HEAD_DIM or q.stride(2) != 1
            or q.stride(1) != head_dim or not k_cache.is_contiguous()
            or not v_cache.is_contiguous() or (sinks is not None and not _fp32_cpu(sinks))
            or (lib := _lib()) is None):
        return None
    # the runner builds both as contiguous int64 on the CPU; anything else is converted
    if table.dtype is not torch.long or not table.is_cpu or not table.is_contiguous():
        table = table.to("cpu", torch.long).contiguous()
    if lens.dtype is not torch.long or not lens.is_cpu or not lens.is_contiguous():
        lens = lens.to("cpu", torch.long).contiguous()
    if sinks is not None:
        sinks = sinks.contiguous()
    out = q.new_empty(batch, heads, head_dim)
    _check(lib.decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0],
        kv_heads, head_dim, table.data_ptr(), table.shape[1], lens.data_ptr(), batch, heads,
        window or 0, None if sinks is None else sinks.data_ptr(), scale, out.data_ptr(),
        torch.get_num_threads()), "decode attention")
    return out
