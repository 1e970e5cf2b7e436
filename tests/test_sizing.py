"""Memory accounting of packed GGUF models: sizing reads each layer's bytes from the tensor table.

A tiny Llama GGUF whose layers mix quantized types (as Q4_K_M does) is written with the `gguf`
package; the sizes the allocator, `/model/list` and a node's KV budget use must be the bytes a
node really holds after loading it packed, and fall back to the config's float estimate when
packing is off.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from parallax.models.hub import ModelSource, builtin_gguf_path
from parallax.models.loader import load_config, load_shard
from parallax.models.quant.formats import QT
from parallax.models.sizing import estimate_layer_bytes, gguf_tensor_bytes, shard_bytes
from parallax.node.agent import shard_weight_bytes
from parallax.scheduler.catalog import ModelCatalog

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 64, 128, 4, 2, 32, 2
HEAD_DIM = HIDDEN // HEADS
# per layer: (tensor, rows, cols); layer 1 holds ffn_down in Q8_0 and v in Q5_1
SHAPES = [("attn_q", HIDDEN, HIDDEN), ("attn_k", KV_HEADS * HEAD_DIM, HIDDEN),
          ("attn_v", KV_HEADS * HEAD_DIM, HIDDEN), ("attn_output", HIDDEN, HIDDEN),
          ("ffn_gate", FFN, HIDDEN), ("ffn_up", FFN, HIDDEN), ("ffn_down", HIDDEN, FFN)]
LAYER_TYPES = [{}, {"ffn_down": QT.Q8_0, "attn_v": QT.Q5_1}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[str, list[int], int, int]:
    """(path, packed + fp32 bytes of each layer, embedding bytes, final norm bytes) of a GGUF
    whose layers mix quantized types."""
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf")
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_context_length(256)
    writer.add_vocab_size(VOCAB)
    writer.add_layer_norm_rms_eps(1e-5)

    def quantized(name: str, rows: int, cols: int, qtype: QT) -> int:
        blocks = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
        writer.add_tensor(name, blocks, raw_dtype=qtype)
        return blocks.nbytes

    def norm(name: str) -> int:
        writer.add_tensor(name, np.ones(HIDDEN, dtype=np.float32))
        return HIDDEN * 4  # fp32 at load

    embedding = quantized("token_embd.weight", VOCAB, HIDDEN, QT.Q8_0)  # tied: no output.weight
    layers = []
    for i, types in enumerate(LAYER_TYPES):
        size = norm(f"blk.{i}.attn_norm.weight") + norm(f"blk.{i}.ffn_norm.weight")
        for kind, rows, cols in SHAPES:
            size += quantized(f"blk.{i}.{kind}.weight", rows, cols, types.get(kind, QT.Q4_0))
        layers.append(size)
    embedding_norm = norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, layers, embedding, embedding_norm


def test_tensor_table_gives_each_layers_packed_bytes(tiny_gguf):
    path, layers, embedding, norm = tiny_gguf
    assert layers[0] != layers[1]  # the mixed layer differs, so a per-layer count matters
    assert gguf_tensor_bytes(path, LAYERS, 4) == (layers, embedding, embedding + norm)
    source = ModelSource("tiny", "gguf", path)
    config = load_config(source)
    assert shard_bytes(source, config, 0, 1, 4) == layers[0] + embedding
    assert shard_bytes(source, config, 1, 2, 4) == layers[1] + embedding + norm
    assert shard_weight_bytes(path, 0, 2, 4) == sum(layers) + embedding + norm  # tied: once


def test_sizes_are_what_a_packed_node_holds(tiny_gguf):
    path, layers, embedding, norm = tiny_gguf
    model = load_shard(path).model
    held = sum(b.numel() for b in model.buffers() if b.dtype == torch.uint8)
    held += sum(p.numel() * p.element_size() for p in model.parameters())
    # the tied LM head shares the embedding's packed table on a stage that holds both
    assert held == sum(layers) + embedding + norm


def test_catalog_and_model_list_use_packed_bytes(tiny_gguf, monkeypatch):
    path, layers, embedding, norm = tiny_gguf
    spec = ModelCatalog(curated={}, include_builtin=False).spec(path)
    assert (spec.layer_bytes, spec.embedding_bytes, spec.lm_head_bytes) == (
        max(layers), embedding, embedding + norm)
    config = load_config(ModelSource("tiny", "gguf", path))
    float_layer = estimate_layer_bytes(config, 4)[0]
    assert spec.layer_bytes < float_layer / 4  # 4-8 bit blocks against fp32
    monkeypatch.setenv("PARALLAX_GGUF_DEQUANTIZE", "1")  # loaded dequantized: the float sizes
    assert gguf_tensor_bytes(path, LAYERS, 4) is None
    dequantized = ModelCatalog(curated={}, include_builtin=False).spec(path)
    assert dequantized.layer_bytes == float_layer
    assert shard_bytes(ModelSource("tiny", "gguf", path), config, 0, 1, 4) == (
        float_layer + estimate_layer_bytes(config, 4)[1])


def test_builtin_model_is_listed_at_its_packed_size():
    """SmolLM2 Q4_1 (98 MB file): listed near its file size, not at its 538 MB in fp32."""
    catalog = ModelCatalog(curated={})
    spec = catalog.spec(None)
    assert 80e6 < spec.total_bytes < 110e6
    entry = next(e for e in catalog.entries() if e["name"] == spec.name)
    assert entry["weights_gb"] < 0.11
    assert shard_weight_bytes(builtin_gguf_path(), 0, spec.num_layers, 4) == spec.total_bytes
