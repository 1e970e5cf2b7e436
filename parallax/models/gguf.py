"""GGUF files: config from metadata, tensors dequantized on load with HF names.

llama.cpp's converter permutes the rows of Q and K for its RoPE layout in Llama models; we
un-permute them so the shard computes exactly what transformers computes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator

import numpy as np
import torch

from parallax.models.weights import ReadLog

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
def open_reader(path: str):
    """A GGUFReader, or a ValueError that says the file is not a readable GGUF.

    Cached: parsing the metadata (the whole vocabulary) takes seconds, and a load needs it twice.
    """
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:  # the gguf package raises bare ValueError/struct errors
        raise ValueError(f"{path} is not a readable GGUF file ({exc}); re-download it") from exc


def field_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


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


def iter_gguf(
    reader, config, owns: Callable[[str], bool], log: ReadLog | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor) for owned tensors, dequantizing only those."""
    from gguf import dequantize

    permuted = config.model_type == "llama"
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None or not owns(name):
            continue
        # gguf shapes are reversed (ggml order); dequantize returns numpy in row-major order
        array = dequantize(tensor.data, tensor.tensor_type).reshape(
            [int(d) for d in reversed(tensor.shape)]
        )
        if permuted and name.endswith("self_attn.q_proj.weight"):
            array = unpermute(array, config.num_attention_heads)
        elif permuted and name.endswith("self_attn.k_proj.weight"):
            array = unpermute(array, config.num_key_value_heads)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # unquantized tensors come back as read-only mmap views
            array = array.copy()
        result = torch.from_numpy(array)
        if log is not None:
            log.record(name, result)
        yield name, result
