"""Memory shape of a model from its config alone, for the scheduler's allocation.

`estimate_layer_bytes` builds the model on the meta device (no memory, no weights) and counts
the parameters each decoder layer really has in our implementation, so every family is sized
by the same code that runs it: all experts of an MoE layer count (a node holds all of them),
gpt-oss' MXFP4 experts count at the load dtype (they are dequantized at load), q/k norms,
sinks and biases count. Model types without a family fall back to a formula.

A GGUF file loaded packed (the default) is sized from its tensor table instead: quantized
tensors of the packed types count their bytes in the file, which is what a node holds, and
every other tensor counts at the load dtype (`gguf_tensor_bytes`). Layers differ there (Q4_K_M
gives some layers Q6_K tensors), so a shard is summed layer by layer (`shard_bytes`).

A float checkpoint loaded with `quantize` ("q8_0" / "q4_0" / "q4_k") counts the weights the
loader packs at blocks × type size (quant/quantize.py `module_bytes`: the same rule picks them).
"""

from __future__ import annotations

import re

import torch

from parallax.models.llama import head_dim_of
from parallax.models.registry import FAMILIES, family_for


def kv_bytes_per_token_per_layer(config, dtype_bytes: int) -> int:
    """K and V of one token in one layer."""
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * num_kv_heads * head_dim_of(config) * dtype_bytes


def estimate_layer_bytes(config, dtype_bytes: int,
                         quantize: str | None = None) -> tuple[int, int, int, int]:
    """(layer_bytes, embedding_bytes, lm_head_bytes, kv_bytes_per_token_per_layer).

    layer_bytes is the largest decoder layer (layers differ when some are dense, e.g. Qwen3-MoE
    `mlp_only_layers`), so a node never gets more layers than fit. lm_head_bytes includes the
    final norm and is the full matrix even with tied embeddings (a last stage that is not the
    first holds its own copy). The KV figure is for a full-attention layer; sliding-window
    layers hold at most their window once the engine frees old blocks. With `quantize`, the
    weights the loader packs count at blocks × type size.
    """
    from parallax.models.quant.quantize import module_bytes, qtype_of

    kv = kv_bytes_per_token_per_layer(config, dtype_bytes)
    if getattr(config, "model_type", None) not in FAMILIES:
        if quantize is not None:
            raise ValueError(f"model_type {config.model_type!r} has no family here, so "
                             "--quantize cannot apply to it")
        layer, embedding, lm_head = formula_param_counts(config)
        return layer * dtype_bytes, embedding * dtype_bytes, lm_head * dtype_bytes, kv
    qtype = None if quantize is None else qtype_of(quantize)
    family = family_for(config.model_type)
    with torch.device("meta"):
        model = family(config, 0, config.num_hidden_layers)
    layer = max(module_bytes(block, dtype_bytes, qtype) for block in model.layers)
    embedding = module_bytes(model.embed_tokens, dtype_bytes, qtype)
    lm_head = module_bytes(model.lm_head, dtype_bytes, qtype) + \
        module_bytes(model.norm, dtype_bytes, None)
    return layer, embedding, lm_head, kv


def formula_param_counts(config) -> tuple[int, int, int]:
    """(params per layer, embedding params, norm + LM head params) of a Llama-style decoder,
    dense or MoE (all routed experts, shared expert if any, router), without building it."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = head_dim_of(config)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, k, v, o
    if getattr(config, "attention_bias", False):
        attention += head_dim * (heads + 2 * kv_heads) + hidden
    num_experts = (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
                   or getattr(config, "n_routed_experts", None) or 0)
    if num_experts:
        expert_size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        mlp = num_experts * 3 * hidden * expert_size + num_experts * hidden  # experts + router
        shared = getattr(config, "shared_expert_intermediate_size", None) or 0
        mlp += 3 * hidden * shared + (hidden if shared else 0)
    else:
        mlp = 3 * hidden * config.intermediate_size
    layer = attention + mlp + 2 * hidden  # + two norms
    embedding = config.vocab_size * hidden
    return layer, embedding, embedding + hidden


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def gguf_tensor_bytes(path: str, num_layers: int,
                      dtype_bytes: int) -> tuple[list[int], int, int] | None:
    """(bytes of each decoder layer, embedding bytes, final norm + LM head bytes) of a GGUF as
    a node holds it, read from the file's tensor table (no tensor data is read); None when
    packing is off (PARALLAX_GGUF_DEQUANTIZE=1: everything is float, the config says it all).

    The LM head of a tied model is the embedding's packed table (a last stage that is not the
    first holds its own copy). A fused module whose parts mix packed and other types is
    dequantized at load; that rare case is counted packed here.
    """
    from parallax.models.gguf import dequantize_requested, hf_name, open_reader
    from parallax.models.quant.formats import PACKED_TYPES, QT

    if dequantize_requested():
        return None
    layers = [0] * num_layers
    embedding = head = norm = 0
    for tensor in open_reader(path).tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        packed = QT(tensor.tensor_type) in PACKED_TYPES
        size = int(tensor.n_bytes) if packed else int(tensor.n_elements) * dtype_bytes
        match = _LAYER.match(name)
        if match:
            layer = int(match.group(1))
            if layer < num_layers:
                layers[layer] += size
        elif name == "model.embed_tokens.weight":
            embedding = size
        elif name == "lm_head.weight":
            head = size
        elif name == "model.norm.weight":
            norm = size
    return layers, embedding, (head or embedding) + norm


def gguf_estimate(path: str, config,
                  dtype_bytes: int) -> tuple[int, int, int, int] | None:
    """`estimate_layer_bytes` for a GGUF file, from its tensor table (None: packing off)."""
    sizes = gguf_tensor_bytes(path, int(config.num_hidden_layers), dtype_bytes)
    if sizes is None:
        return None
    layers, embedding, lm_head = sizes
    return max(layers), embedding, lm_head, kv_bytes_per_token_per_layer(config, dtype_bytes)


def model_estimate(source, config, dtype_bytes: int,
                   quantize: str | None = None) -> tuple[int, int, int, int]:
    """`estimate_layer_bytes` of a resolved model source: a GGUF by its tensor table, any other
    source (or a GGUF loaded dequantized) by its config, quantized by `quantize` (a GGUF with
    `quantize` is a ValueError: it is quantized already)."""
    _check_quantize(source, quantize)
    if getattr(source, "kind", None) == "gguf":
        estimate = gguf_estimate(source.path, config, dtype_bytes)
        if estimate is not None:
            return estimate
    return estimate_layer_bytes(config, dtype_bytes, quantize)


def _check_quantize(source, quantize: str | None) -> None:
    from parallax.models.hub import check_quantize_source

    if source is not None:
        check_quantize_source(source, quantize)


def shard_bytes(source, config, start: int, end: int, dtype_bytes: int,
                quantize: str | None = None) -> int:
    """Weight bytes a node holds for layers [start, end) (+ embedding on the first stage, norm
    and LM head on the last; a tied matrix once on a stage that is both), each layer by its own
    tensors for a GGUF."""
    _check_quantize(source, quantize)
    first, last = start == 0, end == config.num_hidden_layers
    sizes = None
    if getattr(source, "kind", None) == "gguf":
        sizes = gguf_tensor_bytes(source.path, int(config.num_hidden_layers), dtype_bytes)
    if sizes is not None:
        layers, embedding, lm_head = sizes
        body = sum(layers[start:end])
    else:
        layer, embedding, lm_head, _ = estimate_layer_bytes(config, dtype_bytes, quantize)
        body = (end - start) * layer
    if first and last and getattr(config, "tie_word_embeddings", False):
        return body + max(embedding, lm_head)
    return body + embedding * first + lm_head * last
