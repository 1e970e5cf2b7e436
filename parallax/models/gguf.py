"""GGUF files: config from metadata, tensors with HF names — packed or dequantized on load.

Quantized tensors of the packed types (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K/MXFP4) come out
as `PackedWeight`s, their block bytes read straight from the file (never through a float copy);
`PARALLAX_GGUF_DEQUANTIZE=1` is the old path that dequantizes everything to float.
llama.cpp's converter permutes the rows of Q and K for its RoPE layout in Llama models; we
un-permute them (on packed bytes too: whole rows move, blocks run along K) so the shard
computes exactly what transformers computes.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Iterator

import numpy as np
import torch

from parallax.models.gguf_table import GGUFTable
from parallax.models.quant.formats import PACKED_TYPES, QT
from parallax.models.quant.packed import PackedWeight
from parallax.models.weights import ReadLog

logger = logging.getLogger(__name__)
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)

# GGUF architecture -> transformers model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


@functools.lru_cache(maxsize=2)
def open_reader(path: str) -> GGUFTable:
    """The file's metadata and tensor table, or a ValueError that says it is not a readable GGUF.

    Cached: a load and the sizing around it read the table several times. Our own light reader
    (gguf_table.py), not gguf.GGUFReader, whose parsed vocabulary would stay in memory.
    """
    try:
        return GGUFTable(path)
    except Exception as exc:  # truncated files raise struct/index errors
        raise ValueError(f"{path} is not a readable GGUF file ({exc}); re-download it") from exc


def field_value(reader: GGUFTable, key: str, default=None):
    return reader.fields.get(key, default)


def gguf_config(reader, path: str = "the GGUF file"):
    """A transformers config built from GGUF metadata."""
    from transformers import AutoConfig

    arch = field_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )

    def meta(key: str, default=None):
        return field_value(reader, f"{arch}.{key}", default)

    num_heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden // num_heads))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    vocab = meta("vocab_size") or len(field_value(reader, "tokenizer.ggml.tokens", []))
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    return AutoConfig.for_model(
        ARCHITECTURES[arch],
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta("context_length", 4096)),
        vocab_size=int(vocab),
        tie_word_embeddings=not has_output,
        eos_token_id=None if eos is None else int(eos),
        bos_token_id=None if bos is None else int(bos),
    )


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = BLOCK_NAME.match(gguf_name)
    if not match or match.group(2) not in TENSOR_NAMES:
        return None
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{TENSOR_NAMES[kind]}.{suffix}"


def unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> rotate-half halves)."""
    rows = weight.shape[0]
    # [heads, rows/heads/2, 2, ...] -> [heads, 2, rows/heads/2, ...]
    shaped = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return shaped.swapaxes(1, 2).reshape(weight.shape)


# Packed by default: the native kernels keep activations in fp32, so a packed model computes
# what the dequantized one does but for summation order (tests/test_gguf_packed.py).
DEQUANTIZE_DEFAULT = "0"


def dequantize_requested() -> bool:
    """PARALLAX_GGUF_DEQUANTIZE=1: load every tensor as float (0: keep quantized ones packed)."""
    value = os.environ.get("PARALLAX_GGUF_DEQUANTIZE", DEQUANTIZE_DEFAULT)
    return value.strip().lower() in ("1", "true", "yes")


def tensor_types(reader, owns: Callable[[str], bool]) -> dict[str, QT]:
    """HF name -> GGUF type of every owned tensor (from the tensor table; no data read)."""
    types = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is not None and owns(name):
            types[name] = QT(tensor.tensor_type)
    return types


def _row_permutation(name: str, config) -> int | None:
    """The head count to un-permute a Llama Q/K weight by, or None for any other tensor."""
    if config.model_type != "llama":
        return None
    if name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if name.endswith("self_attn.k_proj.weight"):
        return config.num_key_value_heads
    return None


def _read_packed(reader, tensor, name: str, config) -> PackedWeight:
    """The tensor's block bytes read from the file into owned memory: touching the reader's
    memmap would add the file's pages to this process's RSS on top of the copy."""
    rows = int(np.prod([int(d) for d in tensor.shape[1:]]))
    path = getattr(tensor, "path", None) or reader.data.filename  # split GGUF: its own part
    blocks = np.fromfile(path, dtype=np.uint8, count=int(tensor.n_bytes),
                         offset=int(tensor.data_offset)).reshape(rows, -1)
    heads = _row_permutation(name, config)
    if heads is not None:
        blocks = np.ascontiguousarray(unpermute(blocks, heads))
    return PackedWeight.from_numpy(blocks, QT(tensor.tensor_type), int(tensor.shape[0]))


def iter_gguf(
    reader, config, owns: Callable[[str], bool], log: ReadLog | None = None,
    packed: set[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
    """Yield (HF name, tensor) for owned tensors: a PackedWeight for names in `packed`, else
    fp32 (dequantizing only those). With `packed` given (packing on), the quantized types that
    could not stay packed are named in a warning; None is the all-float path."""
    from gguf import dequantize

    dequantized: dict[str, int] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None or not owns(name):
            continue
        if packed is not None and name in packed:
            weight = _read_packed(reader, tensor, name, config)
            if log is not None:
                log.record(name, weight.data)
            yield name, weight
            continue
        qtype = QT(tensor.tensor_type)
        if packed is not None and qtype not in FLOAT_TYPES:
            dequantized[qtype.name] = dequantized.get(qtype.name, 0) + 1
        # gguf shapes are reversed (ggml order); dequantize returns numpy in row-major order
        array = dequantize(tensor.data, tensor.tensor_type).reshape(
            [int(d) for d in reversed(tensor.shape)]
        )
        heads = _row_permutation(name, config)
        if heads is not None:
            array = unpermute(array, heads)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # unquantized tensors come back as read-only mmap views
            array = array.copy()
        result = torch.from_numpy(array)
        if log is not None:
            log.record(name, result)
        yield name, result
    for type_name, count in sorted(dequantized.items()):
        logger.warning("GGUF type %s has no packed kernel (packed: %s): %d tensors were "
                       "dequantized to float", type_name, ", ".join(t.name for t in PACKED_TYPES),
                       count)
