"""Frame 2 of a LinkActivations (links.py): hidden states as raw bytes, and back.

    sender:   hidden [T, H] (any device) --hidden_frame--> (dtype name, raw bytes in row order)
    receiver: (raw bytes, dtype name, H) --read_hidden--> hidden [T, H] on the CPU

The dtype travels by name in the header (`LinkActivations.dtype`) and is looked up in
WIRE_DTYPES, never with getattr on what a sender wrote; the receiver casts to its own dtype, so a
CPU stage in float32 and a GPU stage in bfloat16 share a pipeline. The receiver checks the
header against its limits (node/links.py) before reading a frame. Kept apart from the other
protocol modules because it needs torch and they do not.
"""

from __future__ import annotations

import torch

# dtypes hidden states may travel in, by name
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hidden_frame(hidden: torch.Tensor) -> tuple[str, memoryview]:
    """`hidden`'s dtype name and its bytes (zero-copy for a contiguous CPU tensor)."""
    hidden = hidden.contiguous()
    return (str(hidden.dtype).removeprefix("torch."),
            memoryview(hidden.cpu().view(torch.uint8).numpy()))


def read_hidden(buffer, dtype: str, hidden_size: int) -> torch.Tensor:
    """[num tokens, hidden_size] from a frame of `dtype` (a WIRE_DTYPES name, checked by the
    caller); a copy, so the frame can be released."""
    return torch.frombuffer(buffer, dtype=WIRE_DTYPES[dtype]).view(-1, hidden_size).clone()
