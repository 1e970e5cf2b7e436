"""Packed GGUF matmul speed: native kernels vs the pure-torch path vs fp32 F.linear, one run.

    .venv/bin/python benchmarks/quant_kernels_bench.py [--threads 2] [--types Q4_0,Q8_0]
        [--batches 1,32] [--shapes 2880x5760]
    .venv/bin/python benchmarks/quant_kernels_bench.py --activations [--threads 1,2]
        [--batches 1,8]

`--activations`: only the decode kernel, fp32 activations vs int8 activations (quantized once
per matmul, integer dot products), as GB/s of packed weight bytes, per thread count.

MXFP4 is gpt-oss' expert type (its safetensors blocks repacked into ggml's layout at load);
its "fp32 F.linear" column is the old path, an fp32 matmul on the dequantized expert, and
2880 → 5760 is one gpt-oss-20b expert's gate_up projection.

Prints the CPU flags and the native variant, then per shape, type and batch the best time
of each path: the fused kernel (weights decoded in registers, fp32 activations), tile + BLAS
(a tile dequantized natively, then BLAS), the AVX2 build's blocked GEMM (a tile dequantized
into L1 once, a register-blocked fp32 microkernel), what PackedLinear picks (fused below
packed.gemm_min_rows rows, blocked or tile + BLAS from there), the pure-torch path and fp32
F.linear on a dense copy; and the picked path's effective GB/s of packed weight bytes; "fused
int8" is the decode kernel with int8 activations (what a node with --activation-int8 on uses
below gemm_min_rows rows). Weights are random (speed does not
depend on the values). On a shared machine, times vary run to run: take the minimum of a few
runs before comparing.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch
import torch.nn.functional as F

from parallax.models.quant import native
from parallax.models.quant.formats import PACKED_TYPES, QT, block_size, random_blocks
from parallax.models.quant.packed import PackedLinear, PackedWeight, tiled_gemm

# (in_features, out_features): a 1-3 B FFN, SmolLM2's FFN, a gpt-oss-20b expert's gate_up
SHAPES = [(2048, 8192), (576, 1536), (2880, 5760)]
BATCHES = [1, 4, 16, 32, 512]


def time_ms(fn, x: torch.Tensor, seconds: float, max_reps: int) -> float:
    """Best time of up to max_reps calls fn(x) within about `seconds` (after one warm-up)."""
    fn(x)
    best, deadline, reps = float("inf"), time.perf_counter() + seconds, 0
    while reps < max_reps and (reps < 1 or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
        reps += 1
    return best * 1e3


def torch_path_layer(weight: PackedWeight) -> PackedLinear:
    """The same weight forced onto the pure-torch path."""
    saved = os.environ.get("PARALLAX_NATIVE_KERNELS")
    os.environ["PARALLAX_NATIVE_KERNELS"] = "0"
    try:
        return PackedLinear(weight)
    finally:
        if saved is None:
            os.environ.pop("PARALLAX_NATIVE_KERNELS")
        else:
            os.environ["PARALLAX_NATIVE_KERNELS"] = saved


def fused(lib: native.NativeKernels, weight: PackedWeight, x: torch.Tensor,
          int8: bool = False) -> torch.Tensor:
    """The fused kernel alone, whatever the batch (with int8 activations if `int8`)."""
    out = torch.empty(x.shape[0], weight.out_features)
    (lib.matmul_q8 if int8 else lib.matmul)(int(weight.qtype), weight.data.data_ptr(), weight.data.shape[1],
               weight.out_features, weight.in_features, x.data_ptr(), x.shape[0],
               out.data_ptr(), weight.out_features, torch.get_num_threads())
    return out


def tiled(lib: native.NativeKernels, weight: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """Tile + BLAS alone, whatever the batch."""
    out = torch.empty(x.shape[0], weight.out_features)
    tiled_gemm(lib, x, weight, out)
    return out


def blocked(lib: native.NativeKernels, weight: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """The blocked GEMM alone (AVX2 builds), whatever the batch."""
    out = torch.empty(x.shape[0], weight.out_features)
    lib.gemm(int(weight.qtype), weight.data.data_ptr(), weight.data.shape[1],
             weight.out_features, weight.in_features, x.data_ptr(), x.shape[0], out.data_ptr(),
             weight.out_features, torch.get_num_threads())
    return out


def measure(cells: list, rounds: int, seconds: float) -> dict:
    """Best time (ms) per (cell key, path name), over `rounds` round-robin passes: on a shared
    machine the other tenants' load comes in bursts, and a round-robin spreads each cell's
    samples across them."""
    best: dict = {}
    for _ in range(rounds):
        for key, paths, _ in cells:
            x = torch.randn(key[3], key[0])
            for name, fn in paths.items():
                if fn is None:
                    continue
                reps = 2 if name == "torch" else 30
                t = time_ms(fn, x, seconds, reps)
                best[key, name] = min(best.get((key, name), float("inf")), t)
    return best


def activation_table(lib: native.NativeKernels, shapes, types, batches, threads: list[int],
                     rounds: int, seconds: float) -> None:
    """GB/s of packed weight bytes, fp32 vs int8 activations, per type, batch and threads."""
    print("| in → out | type | batch | threads | fp32-act GB/s | int8-act GB/s | int8 / fp32 |")
    print("|---|---|---|---|---|---|---|")
    weights = [(k, n, qtype, PackedWeight.from_numpy(random_blocks(qtype, n, k), qtype, k))
               for k, n in shapes for qtype in types if k % block_size(qtype) == 0]
    for count in threads:
        torch.set_num_threads(count)
        cells = [((k, n, qtype, batch), {"fp32": functools.partial(fused, lib, w),
                                         "int8": functools.partial(fused, lib, w, int8=True)},
                  w.nbytes) for k, n, qtype, w in weights for batch in batches]
        best = measure(cells, rounds, seconds)
        for (k, n, qtype, batch), _, num_bytes in cells:
            key = (k, n, qtype, batch)
            gbs = [num_bytes / best[key, name] / 1e6 for name in ("fp32", "int8")]
            print(f"| {k} → {n} | {qtype.name} | {batch} | {count} | {gbs[0]:.1f} | "
                  f"{gbs[1]:.1f} | {gbs[1] / gbs[0]:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="thread count (with --activations: a comma-separated list)")
    parser.add_argument("--activations", action="store_true",
                        help="only the decode kernel: fp32 vs int8 activations, GB/s")
    parser.add_argument("--types", default=",".join(t.name for t in PACKED_TYPES))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                        help="in_features x out_features, comma-separated")
    parser.add_argument("--seconds", type=float, default=0.2, help="time per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(threads[0])
    lib = native.kernels()
    print(f"CPU flags: {native.flags_summary()}; "
          f"threads {args.threads}; native variant: {lib.variant if lib else 'none (torch path)'}")
    types = [QT[name] for name in args.types.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    cells = []
    shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
    if args.activations:
        if lib is None:
            raise SystemExit("--activations needs the native kernels (gcc)")
        activation_table(lib, shapes, types, batches, threads, args.rounds, args.seconds)
        return
    for in_features, out_features in shapes:
        dense = torch.randn(out_features, in_features)
        for qtype in types:
            if in_features % block_size(qtype):
                continue  # K-quants need K % 256 == 0 (llama.cpp picks a legacy type there)
            blocks = random_blocks(qtype, out_features, in_features)
            weight = PackedWeight.from_numpy(blocks, qtype, in_features)
            int8 = lib is not None and lib.supports_q8(qtype, in_features)
            paths = {"fused": functools.partial(fused, lib, weight) if lib else None,
                     "fused int8": functools.partial(fused, lib, weight, int8=True)
                     if int8 else None,
                     "tiled": functools.partial(tiled, lib, weight) if lib else None,
                     "blocked": functools.partial(blocked, lib, weight)
                     if lib and lib.gemm_min_rows(qtype, False) is not None else None,
                     "native": PackedLinear(weight) if lib else None,
                     "torch": torch_path_layer(weight),
                     "fp32": functools.partial(F.linear, weight=dense)}
            for batch in batches:
                cells.append(((in_features, out_features, qtype, batch), paths, blocks.nbytes))
    best = measure(cells, args.rounds, args.seconds)
    print("| in → out | type | batch | fused ms | fused int8 ms | tile + BLAS ms | blocked ms | "
          "picked ms | torch-path ms | fp32 F.linear ms | picked GB/s | picked vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, _, num_bytes in cells:
        in_features, out_features, qtype, batch = key
        t_fused, t_int8, t_tiled, t_blocked, t_native = (
            best.get((key, name), float("nan"))
            for name in ("fused", "fused int8", "tiled", "blocked", "native"))
        t_torch, t_dense = best[key, "torch"], best[key, "fp32"]
        print(f"| {in_features} → {out_features} | {qtype.name} | {batch} | {t_fused:.3f} | "
              f"{t_int8:.3f} | {t_tiled:.3f} | {t_blocked:.3f} | {t_native:.3f} | "
              f"{t_torch:.1f} | {t_dense:.3f} | {num_bytes / t_native / 1e6:.1f} | "
              f"{t_dense / t_native:.2f}× |")


if __name__ == "__main__":
    main()
