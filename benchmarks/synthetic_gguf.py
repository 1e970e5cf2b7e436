"""A synthetic ~1.2 B-parameter Llama GGUF for benchmarks, built once and cached.

    .venv/bin/python benchmarks/synthetic_gguf.py [--layout q4_k_m|q8_0] [--out DIR]

Speed and memory do not depend on the weights' values, so the tensors are random blocks with
small finite scales. The shape follows Llama-3.2-1B (hidden 2048, 16 layers, FFN 8192, 32 query
heads over 8 KV heads) with SmolLM2's tokenizer (vocab 49152, copied from the built-in GGUF so
both we and llama.cpp can load the file) and an untied output matrix: 1.17 B parameters.

Layouts:
- `q4_k_m`: what llama.cpp's Q4_K_M writes — Q4_K everywhere except `attn_v` and `ffn_down` in
  the "more bits" layers (first and last eighth, every third in between), which are Q6_K, and
  the output matrix, which is Q6_K.
- `q8_0`: every matrix Q8_0.
Norm weights are F32 ones. Tests never need this file.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from parallax.models.hub import builtin_gguf_path
from parallax.models.quant.formats import QT, block_size, random_blocks, type_size

LAYOUTS = ("q4_k_m", "q8_0")


@dataclass(frozen=True)
class SyntheticShape:
    hidden: int = 2048
    num_layers: int = 16
    intermediate: int = 8192
    num_heads: int = 32
    num_kv_heads: int = 8
    vocab: int = 49152  # SmolLM2's tokenizer

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.num_heads * self.num_kv_heads

    def num_params(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
        per_layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.num_layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


def _more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, every third between."""
    eighth = num_layers // 8
    return layer < eighth or layer >= num_layers - eighth or (layer - eighth) % 3 == 2


def matrix_type(layout: str, name: str, layer: int | None, num_layers: int) -> QT:
    """The GGUF type the layout gives one weight matrix."""
    if layout == "q8_0":
        return QT.Q8_0
    if name == "output":
        return QT.Q6_K
    if name in ("attn_v", "ffn_down") and _more_bits(layer, num_layers):
        return QT.Q6_K
    return QT.Q4_K


def _random_matrix(qtype: QT, rows: int, cols: int, seed: int) -> np.ndarray:
    """Packed bytes [rows, row_bytes] of random weights with small finite scales."""
    if qtype != QT.Q8_0:
        return random_blocks(qtype, rows, cols, seed)
    # Q8_0 block: fp16 scale, then 32 int8 values (random bytes are valid int8 values)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // block_size(qtype), type_size(qtype)),
                          dtype=np.uint8)
    blocks[:, :2] = rng.uniform(1e-4, 1e-3, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _copy_tokenizer(writer: GGUFWriter) -> None:
    """Every tokenizer.* field of the built-in SmolLM2 GGUF, so the file has a real tokenizer."""
    reader = GGUFReader(builtin_gguf_path())
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif kind == GGUFValueType.STRING:
            writer.add_string(key, value)
        elif kind == GGUFValueType.BOOL:
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, int(value))


def _matrices(shape: SyntheticShape) -> list[tuple[str, str, int | None, int, int]]:
    """(gguf name, kind, layer, rows, cols) of every weight matrix, in file order."""
    out = [("token_embd.weight", "token_embd", None, shape.vocab, shape.hidden)]
    for layer in range(shape.num_layers):
        for kind, rows, cols in (
            ("attn_q", shape.hidden, shape.hidden), ("attn_k", shape.kv_dim, shape.hidden),
            ("attn_v", shape.kv_dim, shape.hidden), ("attn_output", shape.hidden, shape.hidden),
            ("ffn_gate", shape.intermediate, shape.hidden),
            ("ffn_up", shape.intermediate, shape.hidden),
            ("ffn_down", shape.hidden, shape.intermediate),
        ):
            out.append((f"blk.{layer}.{kind}.weight", kind, layer, rows, cols))
    out.append(("output.weight", "output", None, shape.vocab, shape.hidden))
    return out


def build(path: Path, layout: str, shape: SyntheticShape = SyntheticShape()) -> Path:
    """Write the synthetic GGUF to `path` (via a temporary name, so a cut run leaves no file)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    tmp = path.with_suffix(".tmp")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name(f"synthetic-llama-{shape.num_params() / 1e9:.2f}B-{layout}")
    writer.add_block_count(shape.num_layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.num_heads)
    writer.add_head_count_kv(shape.num_kv_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.vocab)
    writer.add_rope_dimension_count(shape.hidden // shape.num_heads)
    _copy_tokenizer(writer)
    ones = np.ones(shape.hidden, dtype=np.float32)
    for seed, (name, kind, layer, rows, cols) in enumerate(_matrices(shape)):
        if layer is not None and kind == "attn_q":
            writer.add_tensor(f"blk.{layer}.attn_norm.weight", ones)
        if layer is not None and kind == "ffn_gate":
            writer.add_tensor(f"blk.{layer}.ffn_norm.weight", ones)
        qtype = matrix_type(layout, kind, layer, shape.num_layers)
        writer.add_tensor(name, _random_matrix(qtype, rows, cols, seed), raw_dtype=qtype)
    writer.add_tensor("output_norm.weight", ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


def cache_dir() -> Path:
    return Path.home() / ".cache" / "parallax" / "bench"


def synthetic_gguf(layout: str, out: Path | None = None) -> Path:
    """The cached synthetic GGUF of this layout, built on first use (a minute or two)."""
    directory = out or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"synthetic-llama-1.2b-{layout}.gguf"
    if not path.exists():
        print(f"building {path} (once) ...", flush=True)
        build(path, layout)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="q4_k_m", choices=LAYOUTS)
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the cache)")
    args = parser.parse_args()
    path = synthetic_gguf(args.layout, args.out)
    print(f"{path}: {path.stat().st_size / 2**20:.0f} MiB, "
          f"{SyntheticShape().num_params() / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
