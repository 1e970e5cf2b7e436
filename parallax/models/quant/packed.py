"""Weights that stay in GGUF's packed blocks: linear layers and embeddings computed on them.

A `PackedWeight` is the raw block bytes of a [out_features, in_features] matrix, one row of
blocks per output feature (uint8 [out_features, bytes_per_row]): rows can be gathered, sliced
and concatenated as bytes, since blocks run along K. No fp32/bf16 copy of the whole matrix ever
exists: the native kernel multiplies the blocks directly, and the torch path dequantizes
TILE_ROWS output rows at a time.

Below gemm_min_rows activation rows (decode) the native fused kernel keeps activations in fp32
by default; with `activation_int8` on it quantizes them to int8 blocks once per matmul and uses
integer dot products, as llama.cpp does (1.6-2.4x the weight bytes per second on one AVX2
core, at the cost of rounding the activations: see `set_activation_int8` in loading.py for
when a node turns it on).
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from parallax.models.quant import native
from parallax.models.quant.formats import PACKED_TYPES, QT, dequantize_rows, row_bytes

TILE_ROWS = 512  # torch path: output rows dequantized per step (peak extra memory: one tile)
# Native path, many activation rows: the AVX2 build's blocked GEMM (kernels.c: a tile of weight
# rows dequantized once into L1, a register-blocked fp32 microkernel) from the rows its
# pq_gemm_min_rows gives, measured on the 2-core machine: 12 with fp32 activations, 16 with int8
# ones (32 for Q4_K). Builds without it (AVX-512, portable) dequantize a tile and multiply it with
# BLAS from GEMM_MIN_ROWS rows (measured in benchmarks/quant_kernels_bench.py on an AVX-512
# machine). Below, the fused kernel decodes weights in registers.
GEMM_MIN_ROWS = 16
GEMM_TILE_VALUES = 1 << 18  # fp32 values per dequantized tile (1 MB: stays in L2 with x)


def activation_int8_default() -> bool:
    """PARALLAX_ACTIVATION_INT8=1|on: new packed layers start with int8 activations (off when
    unset; a node decides per model through loading.set_activation_int8)."""
    value = os.environ.get("PARALLAX_ACTIVATION_INT8", "0").strip().lower()
    return value in ("1", "on", "true", "yes")


@dataclass(eq=False)
class PackedWeight:
    """Packed block bytes of a [out_features, in_features] weight and their GGUF type."""

    data: torch.Tensor  # uint8 [out_features, row_bytes]
    qtype: QT
    in_features: int

    def __post_init__(self) -> None:
        self.qtype = QT(self.qtype)
        if self.qtype not in PACKED_TYPES:
            raise ValueError(f"{self.qtype.name} is not a packed type; packed: "
                             f"{', '.join(t.name for t in PACKED_TYPES)}")
        expected = row_bytes(self.qtype, self.in_features)
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 or self.data.shape[1] != expected:
            raise ValueError(f"{self.qtype.name} rows of {self.in_features} values are {expected} "
                             f"uint8 bytes, got {self.data.dtype} {tuple(self.data.shape)}")

    @classmethod
    def from_numpy(cls, blocks: np.ndarray, qtype: QT, in_features: int) -> PackedWeight:
        """Wrap block bytes (e.g. a GGUF memmap view, [rows, row_bytes] uint8) without a copy."""
        array = blocks.reshape(blocks.shape[0], -1)
        with warnings.catch_warnings():  # a read-only memmap warns; nothing ever writes to it
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        return cls(tensor, qtype, in_features)

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, index: torch.Tensor | slice) -> PackedWeight:
        """The packed rows at `index` (a permutation, a gather, or a slice)."""
        return PackedWeight(self.data[index], self.qtype, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The whole matrix in fp32 (tests and debugging only: this is the copy we avoid)."""
        return dequantize_rows(self.data, self.qtype)


def concat(weights: list[PackedWeight]) -> PackedWeight:
    """Stack the rows of same-type weights (q|k|v, gate|up) into one packed weight."""
    first = weights[0]
    if any(w.qtype != first.qtype or w.in_features != first.in_features for w in weights):
        raise ValueError("only weights of one type and width can be stacked")
    return PackedWeight(torch.cat([w.data for w in weights]), first.qtype, first.in_features)


class _Scratch(threading.local):
    """Per-thread fp32 buffer for the dequantized tile of the native GEMM path (ctypes calls
    release the GIL, so two threads may multiply at once)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.float32)

    def get(self, numel: int) -> torch.Tensor:
        if self.buffer.numel() < numel:
            self.buffer = torch.empty(max(numel, 2 * self.buffer.numel()), dtype=torch.float32)
        return self.buffer[:numel]


_SCRATCH = _Scratch()


def torch_matmul(x: torch.Tensor, weight: PackedWeight, out: torch.Tensor) -> None:
    """out[m, n] = x[m, k] @ W^T by dequantizing TILE_ROWS rows at a time (any device)."""
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    xc = x.to(compute)
    for start in range(0, weight.out_features, TILE_ROWS):
        tile = dequantize_rows(weight.data[start : start + TILE_ROWS], weight.qtype).to(compute)
        out[:, start : start + tile.shape[0]] = F.linear(xc, tile)


def native_gemm(lib: native.NativeKernels, x: torch.Tensor, weight: PackedWeight,
                out: torch.Tensor) -> None:
    """out = x @ W^T for many rows (out: [m, n], rows may be strided): the library's blocked
    GEMM where it has one, else `tiled_gemm`."""
    if not lib.blocked_gemm:
        tiled_gemm(lib, x, weight, out)
        return
    if lib.gemm(int(weight.qtype), weight.data.data_ptr(), weight.data.shape[1],
                weight.out_features, weight.in_features, x.data_ptr(), x.shape[0],
                out.data_ptr(), out.stride(0), torch.get_num_threads()) != 0:
        raise RuntimeError(f"native {weight.qtype.name} GEMM refused {weight.shape}")


def tiled_gemm(lib: native.NativeKernels, x: torch.Tensor, weight: PackedWeight,
               out: torch.Tensor) -> None:
    """out = x @ W^T: a tile of weight rows dequantized natively into a reused fp32 buffer at
    a time, multiplied by BLAS (faster than decoding once per MAXR rows)."""
    k, n = weight.in_features, weight.out_features
    rows = max(16, min(GEMM_TILE_VALUES // k, n))
    buffer = _SCRATCH.get(rows * k)
    threads = torch.get_num_threads()
    ptr, row_bytes = weight.data.data_ptr(), weight.data.shape[1]
    for start in range(0, n, rows):
        count = min(rows, n - start)
        if lib.dequantize(int(weight.qtype), ptr + start * row_bytes, row_bytes, count, k,
                          buffer.data_ptr(), threads) != 0:
            raise RuntimeError(f"native {weight.qtype.name} dequantize refused {weight.shape}")
        torch.mm(x, buffer[: count * k].view(count, k).t(), out=out[:, start : start + count])


def gemm_min_rows(lib: native.NativeKernels | None, qtype: QT, activation_int8: bool) -> int:
    """Activation rows from which the native path multiplies through `native_gemm` instead
    of the fused kernel (`activation_int8`: whether that kernel would take int8 activations)."""
    blocked = None if lib is None else lib.gemm_min_rows(qtype, activation_int8)
    return GEMM_MIN_ROWS if blocked is None else blocked


def native_for(lib: native.NativeKernels | None, weight: PackedWeight) -> bool:
    """Whether `lib` multiplies this weight: CPU, contiguous bytes, type and K supported."""
    return (lib is not None and weight.data.device.type == "cpu" and weight.data.is_contiguous()
            and lib.supports(weight.qtype, weight.in_features))


def packed_matmul(x: torch.Tensor, weight: PackedWeight, lib: native.NativeKernels | None,
                  activation_int8: bool = False) -> torch.Tensor:
    """x [m, k] @ W^T -> [m, n], fp32 on CPU (x's dtype elsewhere), for one packed weight (an
    MoE expert's). `lib`: the native kernels where `native_for` allows them, else None (the
    torch path). The fused kernel below gemm_min_rows rows (with int8 activations when
    `activation_int8` and the library supports the type), the tiled GEMM from there."""
    m, n = x.shape[0], weight.out_features
    out = torch.empty(m, n, dtype=torch.float32 if x.device.type == "cpu" else x.dtype,
                      device=x.device)
    if lib is None:
        torch_matmul(x, weight, out)
        return out
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    int8 = activation_int8 and lib.supports_q8(weight.qtype, weight.in_features)
    if m >= gemm_min_rows(lib, weight.qtype, int8):
        native_gemm(lib, xf, weight, out)
        return out
    fn = lib.matmul_q8 if int8 else lib.matmul
    if fn(int(weight.qtype), weight.data.data_ptr(), weight.data.shape[1], n, weight.in_features,
          xf.data_ptr(), m, out.data_ptr(), n, torch.get_num_threads()) != 0:
        raise RuntimeError(f"native {weight.qtype.name} matmul refused shape {weight.shape}")
    return out


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W in packed blocks; W may be row segments of different types.

    Segments of one type are stacked into one packed weight at construction; a layer whose
    parts differ (Q4_K_M's q/k in Q4_K, v in Q6_K) keeps one segment per type and writes each
    into its columns of the output.
    """

    def __init__(self, weights: PackedWeight | list[PackedWeight],
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        parts = [weights] if isinstance(weights, PackedWeight) else list(weights)
        segments: list[list[PackedWeight]] = []
        for part in parts:
            if segments and segments[-1][0].qtype == part.qtype:
                segments[-1].append(part)
            else:
                segments.append([part])
        merged = [group[0] if len(group) == 1 else concat(group) for group in segments]
        self.in_features = merged[0].in_features
        if any(w.in_features != self.in_features for w in merged):
            raise ValueError("every part of a packed linear needs the same in_features")
        self.out_features = sum(w.out_features for w in merged)
        self.qtypes = [w.qtype for w in merged]
        for i, w in enumerate(merged):
            self.register_buffer(f"packed_{i}", w.data, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.activation_int8 = activation_int8_default()
        self.refresh()

    @property
    def segments(self) -> list[PackedWeight]:
        return [PackedWeight(getattr(self, f"packed_{i}"), qtype, self.in_features)
                for i, qtype in enumerate(self.qtypes)]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.segments)

    def _apply(self, fn, recurse=True):
        # .to(device) replaces the buffers: the cached pointers must follow
        result = super()._apply(fn, recurse)
        self.refresh()
        return result

    def refresh(self) -> None:
        """Decide per segment: native kernel (CPU, built, type supported) or the torch path.

        Runs at construction and after .to(); call it again after changing
        PARALLAX_NATIVE_KERNELS to switch an existing layer. Below gemm_min_rows rows a native
        segment uses the int8-activation kernel when `activation_int8` is set and the library
        has it for the type (see `set_activation_int8`)."""
        lib = native.kernels()
        self._native = lib
        self._calls: list[tuple] = []
        offset = 0
        for w in self.segments:
            use_native = native_for(lib, w)
            matmul, gemm_rows = None, GEMM_MIN_ROWS
            if use_native:
                int8 = self.activation_int8 and lib.supports_q8(w.qtype, self.in_features)
                matmul = lib.matmul_q8 if int8 else lib.matmul
                gemm_rows = gemm_min_rows(lib, w.qtype, int8)
            self._calls.append((w, use_native, offset, int(w.qtype), w.data.data_ptr(),
                                w.data.shape[1], w.out_features, matmul, gemm_rows))
            offset += w.out_features

    def set_activation_int8(self, enabled: bool) -> None:
        """Quantize activations to int8 for the decode-sized native matmuls (or stop)."""
        self.activation_int8 = bool(enabled)
        self.refresh()

    def native_segments(self) -> list[tuple[int, int, int, int, bool]] | None:
        """Per segment (qtype, data pointer, row bytes, rows, int8 activations) when every
        segment runs on the native kernels, else None (the one-call decode step's input)."""
        if not all(use for _, use, *_ in self._calls):
            return None
        return [(qtype, pointer, row_bytes, rows, matmul is self._native.matmul_q8)
                for _, _, _, qtype, pointer, row_bytes, rows, matmul, _ in self._calls]

    def kernel_paths(self) -> list[str]:
        """Per segment: "<type>:native-<isa>", "<type>:native-<isa>-int8" (int8 activations
        below gemm_min_rows rows) or "<type>:torch" (for logs and /health)."""
        paths = []
        for w, use, *_, matmul, _ in self._calls:
            path = "torch" if not use else f"native-{self._native.variant}"
            if use and matmul is self._native.matmul_q8:
                path += "-int8"
            paths.append(f"{w.qtype.name}:{path}")
        return paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        out = torch.empty(m, self.out_features, dtype=torch.float32 if x.device.type == "cpu"
                          else x.dtype, device=x.device)
        xf = None
        n_out = self.out_features
        for w, use_native, offset, qtype, w_ptr, w_row_bytes, n, matmul, gemm_rows in \
                self._calls:
            if use_native:
                if xf is None:
                    xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else \
                        x2.float().contiguous()
                if m >= gemm_rows:
                    native_gemm(self._native, xf, w, out[:, offset : offset + n])
                    continue
                status = matmul(
                    qtype, w_ptr, w_row_bytes, n, self.in_features, xf.data_ptr(), m,
                    out.data_ptr() + 4 * offset, n_out, torch.get_num_threads())
                if status != 0:
                    raise RuntimeError(f"native {w.qtype.name} matmul refused shape {w.shape}")
            else:
                torch_matmul(x2, w, out[:, offset : offset + n])
        if self.bias is not None:
            out.add_(self.bias)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.view(*lead, n_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"paths={self.kernel_paths()}")


class PackedEmbedding(nn.Module):
    """Token embedding over packed rows: a lookup dequantizes only the requested rows."""

    def __init__(self, weight: PackedWeight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.qtype = weight.qtype
        self.embedding_dim = weight.in_features
        self.num_embeddings = weight.out_features
        self.dtype = dtype
        self.register_buffer("packed", weight.data, persistent=False)

    @property
    def weight_packed(self) -> PackedWeight:
        """The packed table (a tied LM head multiplies with it through PackedLinear)."""
        return PackedWeight(self.packed, self.qtype, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.packed.index_select(0, ids.reshape(-1))
        values = dequantize_rows(rows, self.qtype).to(self.dtype)
        return values.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"


def native_call_count() -> int:
    """Calls the native library has served in this process (0 when it is not loaded)."""
    lib = native.kernels()
    return 0 if lib is None else int(lib.call_count())
