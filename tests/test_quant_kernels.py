"""Packed GGUF matmuls equal gguf's own dequantization followed by an fp32 matmul.

Every packed type, batch 1 / 7 / 64, an output width that is neither a multiple of the native
row chunk nor of the torch path's tile, K not a multiple of 256 for the 32-value legacy blocks;
through each native variant this CPU can run and through the pure-torch path.
"""

from __future__ import annotations

import logging
import shutil

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
    for batch in (1, 7, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 64):  # fused kernel, then tiled GEMM
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
    assert native.pick_variant(frozenset(avx512 | {"avx512_vnni"})) == "avx512"
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
