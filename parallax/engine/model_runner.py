"""Runs one scheduled batch through the shard: builds inputs, attention metadata, the KV cache."""

from __future__ import annotations

import torch

from parallax.engine.batcher import ScheduledChunk
from parallax.models.attention import AttentionMetadata, PrefillSpan


def kv_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of K and V one token takes across the shard's layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(
        2 * layer.num_kv_heads * layer.head_dim * element for layer in model.attention_layers
    )


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        num_slots = num_blocks * block_size
        for layer in model.attention_layers:
            shape = (num_slots, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        blocks = torch.tensor(block_table, dtype=torch.long)
        # [num_blocks, block_size] -> flat slots of positions 0.. in block order
        slots = (blocks[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
        return slots[start:end]

    def prepare(self, chunks: list[ScheduledChunk], is_first: bool):
        """Flat inputs, positions and attention metadata; decode chunks must come first."""
        positions, slot_mapping, token_ids, hiddens = [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        offset = 0
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start_position, chunk.start_position + chunk.num_tokens
            context_slots = self._slots(seq.block_table, 0, end)
            positions.append(torch.arange(start, end))
            slot_mapping.append(context_slots[start:end])
            if is_first:
                token_ids.extend(seq.token_ids[start:end])
            else:
                hiddens.append(chunk.hidden)
            if chunk.is_decode:
                decode_tables.append(context_slots)
                decode_lens.append(end)
            else:
                prefills.append(PrefillSpan(offset, offset + chunk.num_tokens, end,
                                            None if start == 0 else context_slots))
            offset += chunk.num_tokens
        meta = AttentionMetadata(slot_mapping=torch.cat(slot_mapping).to(self.device))
        if decode_tables:
            meta.num_decode_tokens = len(decode_tables)
            meta.decode_slot_table = torch.nn.utils.rnn.pad_sequence(
                decode_tables, batch_first=True
            ).to(self.device)
            meta.decode_context_lens = torch.tensor(decode_lens, device=self.device)
        for span in prefills:
            if span.context_slots is not None:
                span.context_slots = span.context_slots.to(self.device)
        meta.prefills = prefills
        if is_first:
            inputs = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        else:
            inputs = torch.cat(hiddens).to(device=self.device, dtype=self.dtype)
        return inputs, torch.cat(positions).to(self.device), meta

    @torch.inference_mode()
    def run(
        self, chunks: list[ScheduledChunk], is_first: bool, is_last: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """Returns (hidden [T, H], logits [N, V] or None, indices into chunks of logit rows)."""
        inputs, positions, meta = self.prepare(chunks, is_first)
        hidden = self.model(inputs, positions, meta)
        if not is_last:
            return hidden, None, []
        due = [i for i, c in enumerate(chunks) if c.completes_sequence]
        if not due:
            return hidden, None, []
        ends = torch.tensor([0] + [c.num_tokens for c in chunks]).cumsum(0)
        rows = ends[torch.tensor(due) + 1] - 1
        return hidden, self.model.compute_logits(hidden[rows.to(hidden.device)]), due
