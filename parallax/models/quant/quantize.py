"""Quantize float weights into GGUF blocks at load time (`--quantize q8_0|q4_0|q4_k`).

The bytes are exactly ggml's layouts (what formats.py dequantizes), so a quantized float
checkpoint runs through the same PackedLinear / PackedEmbedding and native kernels as a GGUF:

- Q8_0: 32 values, d = amax / 127 (fp16), q = round(x / d) in int8.
- Q4_0: 32 values, d = (the value of largest magnitude) / -8 (fp16), q = round(x / d) + 8 in
  [0, 15]: the extreme value maps to -8 exactly, as ggml does.
- Q4_K: super-blocks of 256 = 8 sub-blocks of 32, x ≈ d·sc_j·q − dmin·m_j with 4-bit q, 6-bit
  sc_j / m_j and fp16 d / dmin. Each sub-block's (scale, min) is searched over a grid of
  candidate scales around the min/max one, each refitted by least squares (the idea of ggml's
  `make_qkx2_quants`, unweighted); the 6-bit scales are then quantized and q recomputed with
  the scales as stored, so rounding never compounds.

Rounding uses the fp16 scales as stored, so Q8_0 / Q4_0 are never worse than gguf's own
quantizer (tests/test_quantize.py). Everything is vectorized torch, chunked by rows so the
extra memory stays at a few tens of MB whatever the tensor's size.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from parallax.config import QUANTIZE_CHOICES
from parallax.models.quant.formats import QT, block_size, row_bytes, type_size
from parallax.models.quant.packed import PackedWeight

logger = logging.getLogger(__name__)

QUANTIZE_TYPES = {name: QT[name.upper()] for name in QUANTIZE_CHOICES}  # q8_0 -> QT.Q8_0, ...
# Routers stay float: tiny, and their logits pick the experts (a flip changes the whole MLP).
ROUTER_NAMES = frozenset({"gate", "router"})
CHUNK_VALUES = 1 << 18  # weight values quantized per step (Q4_K's search holds ~22 copies)
# Q4_K's candidate scales: (15 + RDELTA·i + RMIN) / (max − min) for i in 0..NSTEP
# (a grid of 9 measured as good as ggml's 21 here: relative RMS error 0.0715 vs 0.0713 on
# Gaussian weights, at 3.5× the speed; the plain min/max fit gives 0.0784)
Q4K_RMIN, Q4K_RDELTA, Q4K_NSTEP = -1.0, 0.25, 8
Q4K_BASE = 4  # the step whose scale is the plain min/max one: 15 + RMIN + RDELTA·4 = 15


def qtype_of(name: str) -> QT:
    """"q8_0" / "q4_0" / "q4_k" -> its GGUF type; ValueError naming the allowed values."""
    try:
        return QUANTIZE_TYPES[name]
    except KeyError:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_TYPES)}, "
                         f"got {name!r}") from None


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 1] -> its fp16 bytes [..., 2] (little-endian, as ggml stores scales)."""
    return values.to(torch.float16).contiguous().view(torch.uint8)


def _as_f16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).float()


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    d = _as_f16(blocks.abs().amax(dim=1, keepdim=True) / 127)
    q = (blocks * _inverse(d)).round().clamp(-127, 127).to(torch.int8)
    return torch.cat((_f16_bytes(d), q.view(torch.uint8)), dim=1)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    index = blocks.abs().argmax(dim=1, keepdim=True)
    d = _as_f16(blocks.gather(1, index) / -8)
    q = ((blocks * _inverse(d)).round() + 8).clamp(0, 15).to(torch.uint8)
    return torch.cat((_f16_bytes(d), q[:, :16] | (q[:, 16:] << 4)), dim=1)


def _fit_affine(n: int, sums: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (scale, offset) of x ≈ scale·q + offset from the sums (Σq, Σx, Σq², Σqx)
    over n values, offset <= 0 (Q4_K stores −offset as a non-negative min)."""
    sq, sx, sqq, sqx = sums
    det = n * sqq - sq * sq
    ok = det > 0
    safe = torch.where(ok, det, 1.0)
    scale = torch.where(ok, (n * sqx - sq * sx) / safe, 0.0)
    offset = torch.where(ok, (sqq * sx - sq * sqx) / safe, sx / n)
    positive = offset > 0  # a positive offset is not storable: refit the scale alone
    scale_only = torch.where(sqq > 0, sqx / torch.where(sqq > 0, sqq, 1.0), 0.0)
    return torch.where(positive, scale_only, scale), torch.where(positive, 0.0, offset)


def _sq_error(n: int, sums: tuple[torch.Tensor, ...], sxx: torch.Tensor, scale: torch.Tensor,
              offset: torch.Tensor) -> torch.Tensor:
    """Σ(scale·q + offset − x)² in closed form from the same sums (no pass over the values)."""
    sq, sx, sqq, sqx = sums
    return (scale * scale * sqq + 2 * scale * offset * sq + n * offset * offset
            - 2 * scale * sqx - 2 * offset * sx + sxx)


def _q4_k_scales(sub: torch.Tensor, refine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block [..., 32] -> (scale >= 0, min >= 0) with x ≈ scale·q − min, q in [0, 15]."""
    low = sub.amin(-1).clamp(max=0)
    span = sub.amax(-1) - low
    scale, offset = span / 15, low
    if not refine:
        return scale, -offset
    n = sub.shape[-1]
    steps = torch.arange(Q4K_NSTEP + 1, dtype=sub.dtype, device=sub.device)
    iscale = (15 + Q4K_RMIN + Q4K_RDELTA * steps) / span.unsqueeze(-1).clamp(min=1e-30)
    q = (sub - low.unsqueeze(-1)).unsqueeze(-2) * iscale.unsqueeze(-1)  # [..., C, 32]
    q = q.round_().clamp_(0, 15)
    sx = sub.sum(-1, keepdim=True)
    sums = (q.sum(-1), sx, (q * q).sum(-1), (q @ sub.unsqueeze(-1)).squeeze(-1))
    cand_scale, cand_offset = _fit_affine(n, sums)
    # the plain min/max fit is a candidate too (its q is step Q4K_BASE's: 15 / span)
    base = tuple(t[..., Q4K_BASE : Q4K_BASE + 1] for t in sums)
    sxx = (sub * sub).sum(-1, keepdim=True)
    err = torch.cat((_sq_error(n, sums, sxx, cand_scale, cand_offset),
                     _sq_error(n, base, sxx, scale.unsqueeze(-1), offset.unsqueeze(-1))), -1)
    cand_scale = torch.cat((cand_scale, scale.unsqueeze(-1)), dim=-1)
    cand_offset = torch.cat((cand_offset, offset.unsqueeze(-1)), dim=-1)
    best = err.argmin(-1, keepdim=True)
    return cand_scale.gather(-1, best).squeeze(-1), -cand_offset.gather(-1, best).squeeze(-1)


def _q4_k(x: torch.Tensor, refine: bool = True) -> torch.Tensor:
    sub = x.reshape(-1, 8, 32)
    scale, mins = _q4_k_scales(sub, refine)
    d = _as_f16(scale.amax(-1, keepdim=True) / 63)
    dmin = _as_f16(mins.amax(-1, keepdim=True) / 63)
    sc = (scale * _inverse(d)).round().clamp(0, 63).to(torch.uint8)
    mn = (mins * _inverse(dmin)).round().clamp(0, 63).to(torch.uint8)
    # q from the scales as stored (d·sc, dmin·m in fp32, as every dequantizer computes them)
    eff_scale, eff_min = d * sc.float(), dmin * mn.float()
    q = ((sub + eff_min.unsqueeze(-1)) * _inverse(eff_scale).unsqueeze(-1)).round()
    q = q.clamp(0, 15).to(torch.uint8)  # [B, 8, 32]
    packed_scales = torch.cat((
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
    ), dim=1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2c / 2c+1: low / high
    return torch.cat((_f16_bytes(d), _f16_bytes(dmin), packed_scales, qs), dim=1)


QUANTIZERS = {QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_K: _q4_k}


def quantize_rows(weight: torch.Tensor, qtype: QT, refine: bool = True) -> torch.Tensor:
    """Float [rows, K] (any float dtype) -> GGUF block bytes uint8 [rows, row_bytes], on CPU.

    K must be a multiple of the type's block size (ValueError otherwise). `refine=False` is the
    plain min/max Q4_K (kept as the baseline the search is tested against)."""
    if weight.dim() != 2:
        raise ValueError(f"quantize takes a 2-D weight, got shape {tuple(weight.shape)}")
    qtype = QT(qtype)
    if qtype not in QUANTIZERS:
        raise ValueError(f"cannot quantize to {qtype.name}; quantizable: "
                         f"{', '.join(t.name for t in QUANTIZERS)}")
    num_rows, k = weight.shape
    out = torch.empty(num_rows, row_bytes(qtype, k), dtype=torch.uint8)
    step = max(1, CHUNK_VALUES // k)
    quantizer = functools.partial(_q4_k, refine=refine) if qtype == QT.Q4_K else QUANTIZERS[qtype]
    for start in range(0, num_rows, step):
        chunk = weight[start : start + step].detach().to("cpu", torch.float32)
        if not torch.isfinite(chunk).all():
            raise ValueError("the weight holds NaN or infinite values: it cannot be quantized")
        blocks = quantizer(chunk)
        out[start : start + chunk.shape[0]] = blocks.reshape(chunk.shape[0], -1)
    return out


def quantize_weight(weight: torch.Tensor, qtype: QT) -> PackedWeight:
    """A float [out, in] weight as a PackedWeight of `qtype` (one output row per block row)."""
    return PackedWeight(quantize_rows(weight, qtype), qtype, int(weight.shape[1]))


# ---- which weights: one rule for the loader and for sizing -------------------------------------

def _width(path: str, module: nn.Module) -> int | None:
    """K of a Linear / Embedding weight that --quantize may pack (None: it stays float)."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.Linear) and path.rpartition(".")[2] not in ROUTER_NAMES:
        return module.in_features
    return None


def quantizable(path: str, module: nn.Module, qtype: QT) -> bool:
    """Whether --quantize packs this module's weight: a Linear (not a MoE router) or the
    embedding, whose K is a multiple of the block size."""
    width = _width(path, module)
    return width is not None and width % block_size(qtype) == 0


def module_bytes(module: nn.Module, dtype_bytes: int, qtype: QT | None) -> int:
    """Bytes of a (meta-device) module's parameters as a node holds them: the weights
    --quantize packs at blocks × type size, every other parameter at the load dtype."""
    total, packed = 0, set()
    if qtype is not None:
        for path, sub in module.named_modules():
            weight = getattr(sub, "weight", None)
            if weight is not None and id(weight) not in packed and quantizable(path, sub, qtype):
                packed.add(id(weight))
                total += weight.numel() // block_size(qtype) * type_size(qtype)
    return total + sum(p.numel() * dtype_bytes for p in module.parameters()
                       if id(p) not in packed)


def quantized_names(shard: nn.Module, names: Iterable[str], qtype: QT) -> dict[str, QT]:
    """Checkpoint name -> qtype of the owned tensors to quantize (every module they fill can be
    packed); a Linear / Embedding weight left float for its width is named in a warning."""
    from parallax.models.quant.loading import _weight_targets

    chosen, left = {}, []
    for name in names:
        targets = [(path, shard.get_submodule(path)) for path, _ in _weight_targets(shard, name)]
        if not targets:
            continue
        if all(quantizable(path, module, qtype) for path, module in targets):
            chosen[name] = qtype
        elif any(_width(path, module) is not None for path, module in targets):
            left.append(name)
    if left:
        logger.warning("--quantize %s: %d tensors stay float (in_features not a multiple of %d): "
                       "%s", qtype.name.lower(), len(left), block_size(qtype), ", ".join(left))
    return chosen


def quantize_stream(items: Iterable[tuple[str, torch.Tensor]], names: set[str],
                    qtype: QT) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
    """The loader's (name, tensor) stream with every tensor in `names` quantized as it passes:
    one float tensor at a time, dropped once packed."""
    for name, tensor in items:
        if name in names:
            try:
                packed = quantize_weight(tensor, qtype)
            except ValueError as exc:
                raise ValueError(f"cannot quantize {name} to {qtype.name.lower()}: {exc}; "
                                 "load it without --quantize") from None
            del tensor
            yield name, packed
        else:
            yield name, tensor
