"""Put packed GGUF weights into a shard: linears become PackedLinear, embeddings PackedEmbedding.

The order matters for memory: `strip` runs on the meta-device shard and drops the float weight
parameters that packed tensors will replace, so `to_empty` never allocates them; `load_weights`
then fills the float tensors as before and swaps a packed module in for each stripped one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from parallax.models.quant.formats import PACKED_TYPES, QT
from parallax.models.quant.packed import PackedEmbedding, PackedLinear, PackedWeight

logger = logging.getLogger(__name__)


def _weight_targets(shard: nn.Module, name: str) -> list[tuple[str, int | None]]:
    """(module path, shard index) of every Linear/Embedding weight a checkpoint tensor fills."""
    targets = []
    for target in shard.checkpoint_to_param_names(name):
        path, param_name, index = shard.locate(target)
        module = shard.get_submodule(path)
        if param_name == "weight" and isinstance(module, (nn.Linear, nn.Embedding)):
            targets.append((path, index))
    return targets


def packable_names(shard: nn.Module, tensor_types: dict[str, QT]) -> set[str]:
    """Checkpoint names that stay packed: every part of their module has a packed type.

    A fused module (q|k|v, gate|up) whose parts mix a packed type with a float or an
    unsupported one is dequantized as a whole, so no module is half packed.
    """
    groups: dict[str, list[str]] = {}
    for name in tensor_types:
        for path, _ in _weight_targets(shard, name):
            groups.setdefault(path, []).append(name)
    packed: set[str] = set()
    for path, names in groups.items():
        expected = len(getattr(shard.get_submodule(path), "shard_sizes", [None]))
        if len(names) == expected and all(tensor_types[n] in PACKED_TYPES for n in names):
            packed.update(names)
    return packed


def strip(shard: nn.Module, packed: set[str]) -> set[str]:
    """Drop the weight parameters packed tensors will replace (call on the meta shard)."""
    paths = {path for name in packed for path, _ in _weight_targets(shard, name)}
    for path in paths:
        shard.get_submodule(path).weight = None
    return paths


def _packed_module(old: nn.Module, pieces: dict[int | None, PackedWeight],
                   dtype: torch.dtype) -> nn.Module:
    if isinstance(old, nn.Embedding):
        weight = pieces[None]
        if weight.shape != (old.num_embeddings, old.embedding_dim):
            raise ValueError(f"embedding is {weight.shape}, the model expects "
                             f"{(old.num_embeddings, old.embedding_dim)}: config and weights disagree")
        return PackedEmbedding(weight, dtype)
    sizes = getattr(old, "shard_sizes", None)
    parts = [pieces[i] for i in range(len(sizes))] if sizes else [pieces[None]]
    for i, part in enumerate(parts):
        rows = sizes[i] if sizes else old.out_features
        if part.shape != (rows, old.in_features):
            raise ValueError(f"packed weight is {part.shape}, the model expects "
                             f"{(rows, old.in_features)}: config and weights disagree")
    new = PackedLinear(parts, None if old.bias is None else old.bias.data)
    if sizes:
        new.shard_sizes = sizes  # attention splits its fused output by these
    return new


def load_weights(shard: nn.Module, items: Iterable[tuple[str, torch.Tensor | PackedWeight]],
                 stripped: set[str], dtype: torch.dtype, device) -> set[str]:
    """Load float tensors through the shard and swap a packed module in for each of `stripped`
    as soon as its last part has been read: the parts (read buffers) are freed module by
    module, so the peak stays near the packed size instead of holding every part until the
    end next to the stacked copies (q|k|v, gate|up)."""
    pieces: dict[str, dict[int | None, PackedWeight]] = {}
    expected = {path: len(getattr(shard.get_submodule(path), "shard_sizes", [None]))
                for path in stripped}
    done: set[str] = set()

    def floats():
        for name, value in items:
            if not isinstance(value, PackedWeight):
                yield name, value
                continue
            for path, index in _weight_targets(shard, name):
                parts = pieces.setdefault(path, {})
                parts[index] = value
                if path in expected and len(parts) == expected[path]:
                    new = _packed_module(shard.get_submodule(path), pieces.pop(path), dtype)
                    parent, _, leaf = path.rpartition(".")
                    setattr(shard.get_submodule(parent) if parent else shard, leaf,
                            new.to(device))
                    done.add(path)
            del value

    loaded = shard.load_weights(floats())
    missing = sorted(stripped - done)
    if missing:
        raise ValueError(f"the GGUF lacks packed weights for {missing[:3]}: the file is "
                         "incomplete or of another architecture")
    loaded.update(f"{path}.weight" for path in stripped)
    log_paths(shard)
    return loaded


def kernel_paths(shard: nn.Module) -> Counter[str]:
    """How many packed segments (a PackedLinear's, or an MoE layer's quantized experts) use
    each "<type>:<path>" (native-<isa> or torch)."""
    counts: Counter[str] = Counter()
    for module in shard.modules():
        if isinstance(module, PackedEmbedding):
            counts[f"{module.qtype.name}:embedding-gather"] += 1
        elif callable(getattr(module, "kernel_paths", None)):  # PackedLinear, MoE experts
            counts.update(module.kernel_paths())
    return counts


def kernel_summary(shard: nn.Module) -> dict[str, str]:
    """Per packed weight type, the path its matmuls take: the native ISA ("avx2", "avx512",
    "generic"; "-int8" appended where decode uses int8 activations), "torch", both joined by "+" when they differ per layer, or "gather" for a type
    only an embedding holds (its rows are dequantized on lookup). Shown in the node's /health."""
    paths: dict[str, set[str]] = {}
    for key in kernel_paths(shard):
        qtype, _, path = key.partition(":")
        paths.setdefault(qtype.lower(), set())
        if path != "embedding-gather":
            paths[qtype.lower()].add(path.removeprefix("native-"))
    return {qtype: "+".join(sorted(found)) or "gather" for qtype, found in sorted(paths.items())}


def log_paths(shard: nn.Module) -> None:
    counts = kernel_paths(shard)
    if counts:
        # packed bytes: PackedLinear buffers and quantized MoE experts (uint8 parameters)
        held = sum(t.numel() for t in (*shard.buffers(), *shard.parameters())
                   if t.dtype == torch.uint8)
        logger.info("packed weights (%.1f MB): %s", held / 1e6,
                    ", ".join(f"{n} × {path}" for path, n in sorted(counts.items())))


# --activation-int8 auto: int8 activations from this many model parameters on. Rounding the
# activations to int8 (blocks of 32) costs a tiny model more of its top-1 choices than a large
# one (measured on SmolLM2-135M Q4_1: benchmarks/README notes), while the speed gain matters
# most where the weights are largest.
ACTIVATION_INT8_MIN_PARAMS = 1_000_000_000


def activation_int8_wanted(mode: str, num_params: int) -> bool:
    """--activation-int8 (validated by config.py): "on", "off", or "auto" (on from
    ACTIVATION_INT8_MIN_PARAMS parameters of the whole model, so every stage agrees)."""
    return mode == "on" or (mode == "auto" and num_params >= ACTIVATION_INT8_MIN_PARAMS)


def set_activation_int8(shard: nn.Module, enabled: bool) -> int:
    """Switch every PackedLinear and packed MoE expert projection of the shard to int8 (or
    fp32) activations for decode-sized matmuls; returns how many segments / expert projections
    now use the int8 kernel (0 without native kernels, on the portable build, or on CUDA)."""
    from parallax.models.moe import FusedExperts

    used = 0
    for module in shard.modules():
        if isinstance(module, PackedLinear):
            module.set_activation_int8(enabled)
        elif isinstance(module, FusedExperts):
            module.activation_int8 = bool(enabled)
        else:
            continue
        used += sum(path.endswith("-int8") for path in module.kernel_paths())
    return used
