"""Packed GGUF matmuls equal gguf's own dequantization followed by an fp32 matmul.

Every packed type, batch 1 / 7 / 64, an output width that is neither a multiple of the native
row chunk nor of the torch path's tile, K not a multiple of 256 for the 32-value legacy blocks;
through each native variant this CPU can run and through the pure-torch path.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

import numpy as np
import pytest
import torch
from gguf import quants

from parallax.models.quant import native
from parallax.models.quant.formats import PACKED_TYPES, QT, block_size, random_blocks
from parallax.models.quant.loading import kernel_summary
from parallax.models.quant.packed import (
    GEMM_MIN_ROWS,
    TILE_ROWS,
    PackedEmbedding,
    PackedLinear,
    PackedWeight,
    gemm_min_rows,
    packed_matmul,
)

OUT_FEATURES = TILE_ROWS + 19  # two torch tiles, the second partial; not a multiple of 16 either
# ||y - ref|| / ||ref||: both paths multiply fp32 activations with exactly dequantized weights
# (the native kernels decode blocks in registers, or a tile for BLAS from GEMM_MIN_ROWS rows
# on), so they differ from the reference by fp32 summation order only.
TORCH_TOLERANCE = 1e-5
NATIVE_TOLERANCE = dict.fromkeys(PACKED_TYPES, TORCH_TOLERANCE)
DEFAULT_NATIVE_TOLERANCE = TORCH_TOLERANCE
HAS_GCC = shutil.which("gcc") is not None


def in_features_for(qtype: QT) -> int:
    return 96 if block_size(qtype) == 32 else 512  # 96: three legacy blocks, not a 256 multiple


def native_variants() -> list[str]:
    """Every variant this CPU can run: the best first, then the narrower ones."""
    flags = native.cpu_flags()
    return [name for name, (needs, _) in native.VARIANTS.items() if needs <= flags]


PATHS = [*(f"native-{v}" for v in native_variants()), "torch"]


@pytest.fixture
def kernel_path(request, monkeypatch):
    """Selects the path for the PackedLinear built inside the test; yields the kernels or None."""
    path = request.param
    if path == "torch":
        monkeypatch.setenv("PARALLAX_NATIVE_KERNELS", "0")
        yield None
        return
    if not HAS_GCC:
        pytest.skip("gcc is not installed: the native kernels cannot be built here")
    monkeypatch.setenv("PARALLAX_NATIVE_KERNELS", path.removeprefix("native-"))
    lib = native.kernels()
    assert lib is not None, "gcc is present, so the native kernels must build"
    yield lib


def relative_error(got: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.numpy() - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("kernel_path", PATHS, indirect=True)
@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_packed_matmul_equals_gguf_dequantize(qtype, kernel_path):
    cols = in_features_for(qtype)
    blocks = random_blocks(qtype, OUT_FEATURES, cols)
    reference_weight = quants.dequantize(blocks, qtype)  # numpy fp32 [out, in]
    layer = PackedLinear(PackedWeight.from_numpy(blocks, qtype, cols))
    expected_path = "torch" if kernel_path is None else f"native-{kernel_path.variant}"
    assert layer.kernel_paths() == [f"{qtype.name}:{expected_path}"]
    tolerance = TORCH_TOLERANCE if kernel_path is None else NATIVE_TOLERANCE[qtype]
    generator = torch.Generator().manual_seed(1)
    # fused kernel, then the GEMM (blocked on AVX2 from 12 rows, tile + BLAS elsewhere from 16)
    for batch in (1, 7, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 64):
        x = torch.randn(batch, cols, generator=generator)
        calls_before = 0 if kernel_path is None else kernel_path.call_count()
        got = layer(x)
        if kernel_path is not None:
            assert kernel_path.call_count() > calls_before, "the native kernel did not run"
        assert got.shape == (batch, OUT_FEATURES)
        error = relative_error(got, x.numpy() @ reference_weight.T)
        assert error < tolerance, f"{qtype.name} batch {batch}: relative error {error:.2e}"


@pytest.mark.parametrize("kernel_path", PATHS[:1] + ["torch"], indirect=True)
def test_mixed_segments_row_gather_and_bias(kernel_path):
    """q|k|v where v has another type (Q4_K_M), rows permuted as bytes, a bias, 3-D input."""
    q, k, v = (random_blocks(t, n, 256, seed) for t, n, seed in
               ((QT.Q4_K, 64, 1), (QT.Q4_K, 32, 2), (QT.Q6_K, 32, 3)))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    parts = [PackedWeight.from_numpy(q, QT.Q4_K, 256).rows(perm),
             PackedWeight.from_numpy(k, QT.Q4_K, 256), PackedWeight.from_numpy(v, QT.Q6_K, 256)]
    bias = torch.randn(128)
    layer = PackedLinear(parts, bias)
    assert [p.split(":")[0] for p in layer.kernel_paths()] == ["Q4_K", "Q6_K"]  # q|k stacked
    weight = np.concatenate([quants.dequantize(q, QT.Q4_K)[perm.numpy()],
                             quants.dequantize(k, QT.Q4_K), quants.dequantize(v, QT.Q6_K)])
    x = torch.randn(2, 3, 256)
    got = layer(x)
    assert got.shape == (2, 3, 128)
    ref = x.reshape(6, 256).numpy() @ weight.T + bias.numpy()
    assert relative_error(got.reshape(6, 128), ref) < DEFAULT_NATIVE_TOLERANCE
    bf16 = layer(x.to(torch.bfloat16))  # the model's dtype comes back
    assert bf16.dtype == torch.bfloat16


def test_embedding_dequantizes_only_requested_rows():
    blocks = random_blocks(QT.Q8_0, 100, 64)
    embedding = PackedEmbedding(PackedWeight.from_numpy(blocks, QT.Q8_0, 64), torch.bfloat16)
    ids = torch.tensor([[3, 99], [0, 3]])
    got = embedding(ids)
    assert got.shape == (2, 2, 64) and got.dtype == torch.bfloat16
    expected = torch.from_numpy(quants.dequantize(blocks[ids.reshape(-1).numpy()], QT.Q8_0))
    assert torch.equal(got.reshape(4, 64), expected.to(torch.bfloat16))
    tied = PackedLinear(embedding.weight_packed)  # a tied LM head shares the packed bytes
    assert tied.packed_0.data_ptr() == embedding.packed.data_ptr()


def test_without_a_compiler_the_torch_path_serves(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PARALLAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-parallax")
    monkeypatch.setenv("PARALLAX_NATIVE_KERNELS", "generic")
    native._load_cached.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert native.kernels() is None
        assert "pure-torch path" in caplog.text
        blocks = random_blocks(QT.Q4_0, 40, 64)
        layer = PackedLinear(PackedWeight.from_numpy(blocks, QT.Q4_0, 64))
        assert layer.kernel_paths() == ["Q4_0:torch"]
        x = torch.randn(3, 64)
        ref = x.numpy() @ quants.dequantize(blocks, QT.Q4_0).T
        assert relative_error(layer(x), ref) < TORCH_TOLERANCE
    finally:
        native._load_cached.cache_clear()  # later tests build/load with the real compiler


def test_variant_choice_follows_cpu_flags():
    assert native.pick_variant(frozenset({"avx2", "fma", "f16c"})) == "avx2"
    avx512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}
    assert native.pick_variant(frozenset(avx512)) == "avx512"
    assert native.pick_variant(frozenset(avx512 | {"avx512_vnni"})) == "avx512vnni"
    assert native.pick_variant(frozenset({"neon", "asimd"})) == "generic"


def test_rejects_a_width_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        PackedWeight(torch.zeros(4, 144, dtype=torch.uint8), QT.Q4_K, 200)


@pytest.mark.parametrize("kernel_path", PATHS[:1] + ["torch"], indirect=True)
def test_kernel_summary_names_the_path_per_type(kernel_path):
    """What the node's /health reports: per packed type, the ISA (or torch, or gather)."""
    linear = PackedLinear(PackedWeight.from_numpy(random_blocks(QT.Q4_K, 8, 256), QT.Q4_K, 256))
    embedding = PackedEmbedding(PackedWeight.from_numpy(random_blocks(QT.Q6_K, 8, 256),
                                                        QT.Q6_K, 256))
    shard = torch.nn.ModuleDict({"proj": linear, "embed": embedding})
    expected = "torch" if kernel_path is None else kernel_path.variant
    assert kernel_summary(shard) == {"q4_k": expected, "q6_k": "gather"}


# ---- int8 activations (decode-sized batches) ---------------------------------------------

# ||y - ref|| / ||ref|| against the fp32 reference: int8 rounding of activations in blocks of
# 32 (step max|x| / 127) leaves ~5e-3 on Gaussian inputs (~7e-3 in Q4_K's blocks of 256);
# 2e-2 catches any decoding mistake
# (a wrong nibble or scale gives O(1)).
INT8_TOLERANCE = 2e-2
# ... and against the reference fed the same int8-rounded activations: summation order only
INT8_ROUNDED_TOLERANCE = 1e-5
INT8_PATHS = [p for p in PATHS if p not in ("torch", "native-generic")]  # x86 builds have it


# the K-quant int8 kernels (Q4_K, Q6_K) round activations per 256 values (llama.cpp's Q8_K),
# every other per 32
ACTIVATION_BLOCK = {QT.Q4_K: 256, QT.Q6_K: 256}


def int8_rounded(x: np.ndarray, block: int = 32) -> np.ndarray:
    """x with every `block`-value block rounded as the kernel does: q = rint(x * 127 /
    max|x|), times max|x| / 127, in fp32."""
    blocks = x.astype(np.float32).reshape(-1, block)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0)
    q = np.rint(blocks * inverse.astype(np.float32))
    return (q * (amax / np.float32(127))).astype(np.float32).reshape(x.shape)


@pytest.mark.parametrize("kernel_path", INT8_PATHS, indirect=True)
@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_int8_activations_differ_from_gguf_reference_by_rounding_only(qtype, kernel_path):
    cols = in_features_for(qtype)
    blocks = random_blocks(qtype, OUT_FEATURES, cols, seed=3)
    reference_weight = quants.dequantize(blocks, qtype)
    layer = PackedLinear(PackedWeight.from_numpy(blocks, qtype, cols))
    layer.set_activation_int8(True)
    assert layer.kernel_paths() == [f"{qtype.name}:native-{kernel_path.variant}-int8"]
    generator = torch.Generator().manual_seed(2)
    for batch in (1, 7, GEMM_MIN_ROWS - 1):
        x = torch.randn(batch, cols, generator=generator)
        calls_before = kernel_path.call_count()
        got = layer(x)
        assert kernel_path.call_count() > calls_before, "the native kernel did not run"
        error = relative_error(got, x.numpy() @ reference_weight.T)
        assert 1e-4 < error < INT8_TOLERANCE, f"{qtype.name} batch {batch}: {error:.2e}"
        rounded = relative_error(
            got, int8_rounded(x.numpy(), ACTIVATION_BLOCK.get(qtype, 32)) @ reference_weight.T)
        assert rounded < INT8_ROUNDED_TOLERANCE, f"{qtype.name} batch {batch}: {rounded:.2e}"
    rows = gemm_min_rows(kernel_path, qtype, True)  # from here fp32 activations (GEMM)
    x = torch.randn(rows, cols, generator=generator)
    assert relative_error(layer(x), x.numpy() @ reference_weight.T) < TORCH_TOLERANCE
    x = torch.randn(rows - 1, cols, generator=generator)  # the largest int8 batch
    assert 1e-4 < relative_error(layer(x), x.numpy() @ reference_weight.T) < INT8_TOLERANCE
    layer.set_activation_int8(False)  # the fp32-activation kernel is still there when asked
    assert layer.kernel_paths() == [f"{qtype.name}:native-{kernel_path.variant}"]
    x = torch.randn(1, cols, generator=generator)
    assert relative_error(layer(x), x.numpy() @ reference_weight.T) < NATIVE_TOLERANCE[qtype]


@pytest.mark.parametrize("kernel_path", INT8_PATHS[:1], indirect=True)
def test_int8_activations_follow_the_environment_default(kernel_path, monkeypatch):
    blocks = random_blocks(QT.Q4_1, 16, 64)
    monkeypatch.delenv("PARALLAX_ACTIVATION_INT8", raising=False)
    assert PackedLinear(PackedWeight.from_numpy(blocks, QT.Q4_1, 64)).kernel_paths() == \
        [f"Q4_1:native-{kernel_path.variant}"]  # off unless asked
    monkeypatch.setenv("PARALLAX_ACTIVATION_INT8", "1")
    assert PackedLinear(PackedWeight.from_numpy(blocks, QT.Q4_1, 64)).kernel_paths() == \
        [f"Q4_1:native-{kernel_path.variant}-int8"]


def test_int8_all_zero_and_mixed_blocks():
    """A zero activation block (scale 0) contributes nothing; others are still exact-ish."""
    if not HAS_GCC or not INT8_PATHS:
        pytest.skip("no native kernels here")
    lib = native.kernels()
    blocks = random_blocks(QT.Q8_0, 40, 128)
    x = torch.randn(2, 128)
    x[0, 32:64] = 0
    x[1] = 0
    got = packed_matmul(x, PackedWeight.from_numpy(blocks, QT.Q8_0, 128), lib, True)
    ref = int8_rounded(x.numpy()) @ quants.dequantize(blocks, QT.Q8_0).T
    assert torch.equal(got[1], torch.zeros(40))
    assert relative_error(got[:1], ref[:1]) < INT8_ROUNDED_TOLERANCE


@pytest.mark.parametrize("kernel_path", ["native-generic"], indirect=True)
def test_portable_build_keeps_fp32_activations(kernel_path):
    """The portable C build has no int8 kernels: asking for them keeps its fp32 kernel."""
    blocks = random_blocks(QT.Q4_K, 16, 256)
    layer = PackedLinear(PackedWeight.from_numpy(blocks, QT.Q4_K, 256))
    layer.set_activation_int8(True)
    assert layer.kernel_paths() == ["Q4_K:native-generic"]
    x = torch.randn(1, 256)
    ref = x.numpy() @ quants.dequantize(blocks, QT.Q4_K).T
    assert relative_error(layer(x), ref) < TORCH_TOLERANCE


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GCC, reason="gcc is not installed")
def test_vnni_variant_compiles_with_dpbusd(monkeypatch, tmp_path):
    """The AVX-512 VNNI build cannot run on an AVX2-only CPU, but it must compile and its int8
    kernels must use dpbusd (objdump shows it)."""
    monkeypatch.setenv("PARALLAX_KERNEL_CACHE", str(tmp_path))
    path = native.build("avx512vnni")
    assert path.exists()
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed: the instruction check needs it")
    disassembly = subprocess.run(["objdump", "-d", str(path)], capture_output=True, text=True,
                                 check=True).stdout
    assert "vpdpbusd" in disassembly
    assert "vpdpbusd" not in subprocess.run(
        ["objdump", "-d", str(native.build("avx2"))], capture_output=True, text=True,
        check=True).stdout


def test_activation_int8_setting_resolves_per_model_size():
    from parallax.config import ConfigError, ExecutorConfig, ServeConfig
    from parallax.models.quant.loading import ACTIVATION_INT8_MIN_PARAMS, activation_int8_wanted

    assert not activation_int8_wanted("auto", 135_000_000)  # SmolLM2: fp32 activations
    assert activation_int8_wanted("auto", ACTIVATION_INT8_MIN_PARAMS)
    assert activation_int8_wanted("on", 1) and not activation_int8_wanted("off", 10**10)
    assert ServeConfig(activation_int8="on").executor.activation_int8 == "on"
    from parallax.cli import build_parser

    assert build_parser().parse_args(["serve"]).activation_int8 == "auto"
    assert build_parser().parse_args(["join", "--activation-int8", "off"]).activation_int8 == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--activation-int8", "maybe"])
    with pytest.raises(ConfigError, match="auto, on, off"):
        ExecutorConfig(activation_int8="yes")


@pytest.mark.parametrize("kernel_path", INT8_PATHS[:1] + ["torch"], indirect=True)
def test_set_activation_int8_switches_every_packed_linear(kernel_path):
    from parallax.models.quant.loading import set_activation_int8

    shard = torch.nn.ModuleDict({
        "a": PackedLinear(PackedWeight.from_numpy(random_blocks(QT.Q4_K, 8, 256), QT.Q4_K, 256)),
        "b": PackedLinear(PackedWeight.from_numpy(random_blocks(QT.Q8_0, 8, 64), QT.Q8_0, 64))})
    expected = 0 if kernel_path is None else 2  # the torch path has no int8 kernel
    assert set_activation_int8(shard, True) == expected
    if kernel_path is not None:
        assert kernel_summary(shard) == {"q4_k": f"{kernel_path.variant}-int8",
                                         "q8_0": f"{kernel_path.variant}-int8"}
    assert set_activation_int8(shard, False) == 0
    assert all(not p.endswith("-int8") for m in shard.values() for p in m.kernel_paths())


@pytest.mark.slow
def test_a_failed_build_falls_back_to_the_next_variant(monkeypatch, tmp_path):
    """The best variant for the CPU fails to compile: the next one it runs is used instead."""
    monkeypatch.setenv("PARALLAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("PARALLAX_NATIVE_KERNELS", raising=False)
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    real_build = native.build

    def build(variant: str):
        if variant == "avx2":
            raise RuntimeError("gcc: error: unrecognized command-line option")
        return real_build(variant)

    monkeypatch.setattr(native, "build", build)
    native._load_cached.cache_clear()
    try:
        lib = native.kernels()
        if HAS_GCC:
            assert lib is not None and lib.variant == "generic"
        else:
            assert lib is None
    finally:
        native._load_cached.cache_clear()


def test_gemm_crossover_per_build():
    """AVX2 builds switch to their blocked GEMM at the rows measured on the 2-core machine;
    builds without it (AVX-512, portable) switch to tile + BLAS at GEMM_MIN_ROWS."""
    if not HAS_GCC:
        pytest.skip("gcc is not installed: the native kernels cannot be built here")
    for variant in native_variants():
        lib = native.load(variant)
        blocked = variant.startswith("avx2")
        assert (lib.gemm_min_rows(QT.Q4_1, False) is not None) == blocked, variant
        expected = {(QT.Q4_1, False): 12, (QT.Q4_K, False): 12, (QT.Q4_1, True): 16,
                    (QT.Q6_K, True): 16, (QT.Q4_K, True): 32}
        for (qtype, int8), rows in expected.items():
            assert gemm_min_rows(lib, qtype, int8) == (rows if blocked else GEMM_MIN_ROWS)
    assert gemm_min_rows(None, QT.Q4_1, True) == GEMM_MIN_ROWS


GEMM_VARIANTS = [v for v in native_variants() if v.startswith("avx2")]


@pytest.mark.skipif(not HAS_GCC, reason="gcc is not installed: no native kernels here")
@pytest.mark.skipif(not GEMM_VARIANTS, reason="no AVX2 on this CPU: no blocked GEMM")
@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_blocked_gemm_equals_gguf_dequantize(qtype):
    """The blocked GEMM at every panel shape (1-8 rows: one 8-row half; 9-16: two; past 16:
    more panels, the last partial), weight rows that fill no tile exactly, K slices of
    GEMM_KC = 256 with a partial last one, and a strided output it must not write past."""
    lib = native.load(GEMM_VARIANTS[0])
    cols = 288 if block_size(qtype) == 32 else 768
    out_features = 53
    blocks = random_blocks(qtype, out_features, cols, seed=5)
    reference_weight = quants.dequantize(blocks, qtype)
    weight = PackedWeight.from_numpy(blocks, qtype, cols)
    generator = torch.Generator().manual_seed(6)
    for batch in (1, 5, 8, 9, 16, 17, 40, 300):  # 300: two passes of GEMM_MC rows
        x = torch.randn(batch, cols, generator=generator)
        out = torch.full((batch, out_features + 3), float("nan"))
        calls_before = lib.call_count()
        status = lib.gemm(int(qtype), weight.data.data_ptr(), weight.data.shape[1], out_features,
                          cols, x.data_ptr(), batch, out.data_ptr(), out.stride(0), 2)
        assert status == 0 and lib.call_count() == calls_before + 1
        assert torch.isnan(out[:, out_features:]).all(), "wrote past its columns"
        error = relative_error(out[:, :out_features].contiguous(), x.numpy() @ reference_weight.T)
        assert error < TORCH_TOLERANCE, f"{qtype.name} batch {batch}: relative error {error:.2e}"
