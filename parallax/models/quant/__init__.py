"""GGUF quantized weights kept packed in memory, with native CPU kernels and a torch fallback."""

from parallax.models.quant.formats import PACKED_TYPES, dequantize_rows
from parallax.models.quant.packed import (
    PackedEmbedding,
    PackedLinear,
    PackedWeight,
    native_call_count,
)

__all__ = ["PACKED_TYPES", "PackedEmbedding", "PackedLinear", "PackedWeight", "dequantize_rows",
           "native_call_count"]
