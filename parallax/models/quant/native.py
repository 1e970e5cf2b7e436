"""Build (once, cached) and load the native packed-matmul kernels for this CPU.

kernels.c (packed matmuls) and decode_ops.c (the fused fp32 ops of a decode step, used by
parallax/models/fused_ops.py and decode_plan.py) are compiled by gcc at first use into one
shared library per ISA variant, in
`$PARALLAX_KERNEL_CACHE` (default `~/.cache/parallax/kernels/`) as `<source hash>-<isa>.so`,
written atomically so concurrent processes never load half a file. The variant is picked at run
time from the CPU's flags: AVX-512 (F/BW/VL) with or without VNNI, AVX2 + FMA + F16C, or portable C (any other CPU,
ARM included, where the compiler's own vectorization is all there is — untested there). The
AVX-512 variant compiles the AVX2 intrinsics with AVX-512 enabled (32 vector registers); it has
not run on this project's AVX2-only machine, nor has the VNNI one (its int8 dot products use
dpbusd): the tests compile it and check for the instruction, and run its int8 kernels with
dpbusd emulated in AVX2 (the test-only "avx2-dpbusd-emu" variant).
Every variant but the portable one also has the int8-activation kernels (`matmul_q8`); the
AVX2 one has a blocked fp32 GEMM for many activation rows (`gemm`, from `gemm_min_rows` on).
Without gcc, or when the build fails, one log line says so and every packed weight uses the
pure-torch path. `PARALLAX_NATIVE_KERNELS=0` forces that path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# kernels.c: matmuls on packed blocks; decode_ops.c: fused fp32 ops of the decode step
SOURCES = (Path(__file__).with_name("kernels.c"), Path(__file__).with_name("decode_ops.c"))
BASE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
AVX512_FLAGS = AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl"]
AVX512_NEEDS = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"})
# variant -> (CPU flags it needs, gcc flags). First match wins. The VNNI variant differs from
# avx512 only in the int8-activation kernels (dpbusd instead of maddubs + madd).
VARIANTS: dict[str, tuple[frozenset[str], list[str]]] = {
    "avx512vnni": (AVX512_NEEDS | {"avx512_vnni"}, AVX512_FLAGS + ["-mavx512vnni"]),
    "avx512": (AVX512_NEEDS, AVX512_FLAGS),
    "avx2": (frozenset({"avx2", "fma", "f16c"}), AVX2_FLAGS),
    "generic": (frozenset(), []),
    # tests only, never picked (generic matches first): the VNNI build's int8 kernels with
    # dpbusd emulated in AVX2, so that code runs on a CPU without VNNI
    "avx2-dpbusd-emu": (frozenset({"avx2", "fma", "f16c"}), AVX2_FLAGS + ["-DPQ_EMULATE_DPBUSD"]),
}
BUILD_TIMEOUT_S = 180
GEMM_NEVER = 1 << 30  # kernels.c: pq_gemm_min_rows where the build has no blocked GEMM


BENCHMARK_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                   "avx512_bf16", "amx_int8", "asimd")


def flags_summary() -> str:
    """The CPU flags that matter to the kernels, for the line printed beside benchmark tables."""
    flags = cpu_flags()
    return " ".join(f for f in BENCHMARK_FLAGS if f in flags) or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 'flags', ARM 'Features'); empty if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def pick_variant(flags: frozenset[str]) -> str:
    """The fastest variant the flags allow."""
    return next(name for name, (needs, _) in VARIANTS.items() if needs <= flags)


def cache_dir() -> Path:
    env = os.environ.get("PARALLAX_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "parallax" / "kernels"


def library_path(variant: str) -> Path:
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES)
                            + " ".join(VARIANTS[variant][1]).encode())
    return cache_dir() / f"{digest.hexdigest()[:16]}-{variant}.so"


def build(variant: str) -> Path:
    """Compile the variant unless it is cached; returns the library path. Raises on failure."""
    target = library_path(variant)
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        raise RuntimeError("gcc is not installed (set CC to a C compiler, or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [compiler, *BASE_FLAGS, *VARIANTS[variant][1], "-o", tmp, *map(str, SOURCES), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent loader sees the old name or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@dataclass(frozen=True)
class NativeKernels:
    """The loaded library and its entry points (ctypes function objects, bound once)."""

    variant: str
    path: Path
    lib: ctypes.CDLL
    matmul: ctypes._CFuncPtr
    dequantize: ctypes._CFuncPtr
    _supports: ctypes._CFuncPtr
    call_count: ctypes._CFuncPtr
    matmul_q8: ctypes._CFuncPtr  # same arguments as matmul; activations quantized to int8
    _supports_q8: ctypes._CFuncPtr
    # decode_ops.c (parallax/models/fused_ops.py calls them)
    rms_norm: ctypes._CFuncPtr
    rope: ctypes._CFuncPtr
    silu_mul: ctypes._CFuncPtr
    decode_attention: ctypes._CFuncPtr
    decode_layers: ctypes._CFuncPtr
    gemm: ctypes._CFuncPtr  # same arguments as matmul: the blocked GEMM (AVX2 builds)
    _gemm_min_rows: ctypes._CFuncPtr
    blocked_gemm: bool = False  # whether `gemm` exists in this build (read once at load)

    def gemm_min_rows(self, qtype: int, activation_int8: bool) -> int | None:
        """Activation rows from which `gemm` beats the fused kernel (`matmul`, or `matmul_q8`
        with int8 activations), or None where this build has no blocked GEMM."""
        if not self.blocked_gemm:
            return None
        return self._gemm_min_rows(int(qtype), int(bool(activation_int8)))

    def supports(self, qtype: int, in_features: int) -> bool:
        """Whether this library multiplies the type at this K (else: the torch path)."""
        return bool(self._supports(int(qtype), in_features))

    def supports_q8(self, qtype: int, in_features: int) -> bool:
        """Whether `matmul_q8` (int8 activations) multiplies the type at this K."""
        return bool(self._supports_q8(int(qtype), in_features))


def load(variant: str) -> NativeKernels:
    """Build if needed and load one variant. Raises RuntimeError/OSError on failure."""
    path = build(variant)
    lib = ctypes.CDLL(str(path))
    lib.pq_isa.restype = ctypes.c_char_p
    compiled = lib.pq_isa().decode()
    if compiled != variant:
        raise RuntimeError(f"{path} was built for {compiled}, expected {variant}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    matmul = lib.pq_matmul
    matmul.restype = ctypes.c_int
    matmul.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, i64, ctypes.c_int]
    dequantize = lib.pq_dequantize
    dequantize.restype = ctypes.c_int
    dequantize.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ctypes.c_int]
    matmul_q8 = lib.pq_matmul_q8
    matmul_q8.restype = ctypes.c_int
    matmul_q8.argtypes = matmul.argtypes
    gemm = lib.pq_gemm
    gemm.restype = ctypes.c_int
    gemm.argtypes = matmul.argtypes
    lib.pq_gemm_min_rows.restype = ctypes.c_int
    lib.pq_gemm_min_rows.argtypes = [ctypes.c_int, ctypes.c_int]
    for supports in (lib.pq_supports, lib.pq_supports_q8):
        supports.restype = ctypes.c_int
        supports.argtypes = [ctypes.c_int, i64]
    lib.pq_call_count.restype = ctypes.c_longlong
    lib.pq_call_count.argtypes = []
    f32, cint = ctypes.c_float, ctypes.c_int
    signatures = {
        "pq_rms_norm": [ptr, ptr, ptr, i64, i64, f32, cint],
        "pq_rope": [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64],
        "pq_silu_mul": [ptr, ptr, i64, i64, cint],
        "pq_decode_attention": [ptr, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64,
                                ptr, f32, ptr, cint],
        "pq_decode_layers": [ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, ptr, cint],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).restype = cint
        getattr(lib, name).argtypes = argtypes
    return NativeKernels(variant, path, lib, matmul, dequantize, lib.pq_supports,
                         lib.pq_call_count, matmul_q8, lib.pq_supports_q8, lib.pq_rms_norm,
                         lib.pq_rope, lib.pq_silu_mul, lib.pq_decode_attention,
                         lib.pq_decode_layers, gemm, lib.pq_gemm_min_rows,
                         lib.pq_gemm_min_rows(0, 0) < GEMM_NEVER)


def requested_variant() -> str | None:
    """PARALLAX_NATIVE_KERNELS: unset/1 = best for this CPU, 0 = torch path, or a variant name."""
    value = os.environ.get("PARALLAX_NATIVE_KERNELS", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return None
    if value in VARIANTS:
        return value
    return pick_variant(cpu_flags())


@functools.lru_cache(maxsize=len(VARIANTS))
def _load_cached(variant: str) -> NativeKernels | None:
    try:
        kernels = load(variant)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("native quantized kernels unavailable (%s); packed weights use the "
                       "slower pure-torch path", exc)
        return None
    logger.info("native quantized kernels: %s (%s); many-row matmuls: %s", variant, kernels.path,
                f"blocked GEMM from {kernels.gemm_min_rows(0, False)} rows"
                if kernels.blocked_gemm else "tile + BLAS")
    return kernels


TEST_ONLY_VARIANTS = frozenset({"avx2-dpbusd-emu"})


def kernels() -> NativeKernels | None:
    """The native kernels for this CPU, or None (disabled, or no compiler / failed builds).

    When the best variant fails to build (an older gcc without -mavx512vnni, say) and none was
    named in PARALLAX_NATIVE_KERNELS, the next one this CPU runs is tried."""
    variant = requested_variant()
    if variant is None:
        return None
    lib = _load_cached(variant)
    if lib is not None or os.environ.get("PARALLAX_NATIVE_KERNELS", "").strip().lower() \
            in VARIANTS:
        return lib
    flags = cpu_flags()
    names = list(VARIANTS)
    for fallback in names[names.index(variant) + 1:]:
        if fallback not in TEST_ONLY_VARIANTS and VARIANTS[fallback][0] <= flags:
            lib = _load_cached(fallback)
            if lib is not None:
                return lib
    return None
