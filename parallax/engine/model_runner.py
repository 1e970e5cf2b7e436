"""Runs one scheduled batch through the shard: builds inputs, attention metadata, the KV cache.

Shards with sliding-window layers have one KV group per window (plus the full-attention group):
each group's layers have their own cache tensors and block tables, and get their own
AttentionMetadata (through `by_window`), listing only the keys their window reads.
"""

from __future__ import annotations

import torch

from parallax.engine.batcher import ScheduledChunk
from parallax.models.attention import AttentionMetadata, PrefillSpan, window_start


def kv_bytes_per_token(
    model: torch.nn.Module, dtype: torch.dtype, window: int | None | str = "all"
) -> int:
    """Bytes of K and V one token takes across the shard's layers (or only the layers whose
    sliding_window equals `window`; None: the full-attention layers)."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(
        2 * layer.num_kv_heads * layer.head_dim * element for layer in model.attention_layers
        if window == "all" or getattr(layer, "sliding_window", None) == window
    )


def layer_windows(model: torch.nn.Module) -> list[int | None]:
    """Distinct attention windows of the shard's layers, None (full attention) first."""
    windows = {getattr(layer, "sliding_window", None) for layer in model.attention_layers}
    return sorted(windows, key=lambda w: (w is not None, w or 0))


def pad_slot_rows(rows: list[torch.Tensor], left: bool = False) -> torch.Tensor:
    """[B, max_len] from slot rows of unequal length, each padded with one of its own slots.

    Padded keys are masked, but SDPA still multiplies their values by a zero weight, and
    0 * NaN is NaN: padding with another sequence's slot (slot 0) would let one request whose
    KV went NaN poison every decode that shares its steps.
    """
    width = max(len(row) for row in rows)
    padded = []
    for row in rows:
        fill = (row[:1] if left else row[-1:]).expand(width - len(row))
        padded.append(torch.cat((fill, row) if left else (row, fill)))
    return torch.stack(padded)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
        window_blocks: dict[int, int] | None = None,
    ) -> None:
        """num_blocks: blocks of the full-attention layers. window_blocks: when given, layers
        with a sliding window W get their own cache of window_blocks[W] blocks, addressed by
        seq.window_tables[W] (KV groups); otherwise every layer shares seq.block_table."""
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.window_blocks = window_blocks or {}
        self.has_full_layers = None in layer_windows(model)
        for layer in model.attention_layers:
            window = getattr(layer, "sliding_window", None)
            blocks = self.window_blocks.get(window, num_blocks) if window else num_blocks
            shape = (blocks * block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        blocks = torch.tensor(block_table, dtype=torch.long)
        # [num_blocks, block_size] -> flat slots of positions 0.. in block order
        slots = (blocks[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
        return slots[start:end]

    def _window_meta(self, chunks: list[ScheduledChunk], window: int) -> AttentionMetadata:
        """Metadata of one sliding-window group: only the slots of keys inside the window."""
        block_size = self.block_size
        slot_mapping, decode_rows, prefills = [], [], []
        offset = 0
        for chunk in chunks:
            table = chunk.seq.window_tables[window]
            start, end = chunk.start_position, chunk.start_position + chunk.num_tokens
            first = window_start(start, window)  # first key position this chunk reads
            first_block = first // block_size
            blocks = torch.tensor(table[first_block : (end - 1) // block_size + 1])
            slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()
            slots = slots[first - first_block * block_size : end - first_block * block_size]
            slot_mapping.append(slots[start - first :])
            if chunk.is_decode:
                decode_rows.append(slots)
            else:
                prefills.append(PrefillSpan(offset, offset + chunk.num_tokens, end,
                                            None if start == 0 else slots.to(self.device),
                                            context_start=first))
            offset += chunk.num_tokens
        meta = AttentionMetadata(slot_mapping=torch.cat(slot_mapping).to(self.device),
                                 prefills=prefills)
        if decode_rows:
            # right-aligned rows: the query's own key last, padding masked out in front
            table = pad_slot_rows(decode_rows, left=True)
            lens = torch.tensor([len(row) for row in decode_rows])
            width = table.shape[1]
            valid = torch.arange(width)[None, :] >= (width - lens)[:, None]
            meta.num_decode_tokens = len(decode_rows)
            meta.window_decode = (table.to(self.device), valid[:, None, None, :].to(self.device))
        return meta

    def prepare(self, chunks: list[ScheduledChunk], is_first: bool):
        """Flat inputs, positions and attention metadata; decode chunks must come first."""
        inputs, positions, meta = self._prepare(chunks, is_first, bool(self.window_blocks))
        if self.window_blocks:
            # one metadata per KV group; paged_attention picks its layer's by window
            groups = {window: self._window_meta(chunks, window) for window in self.window_blocks}
            if meta is not None:
                groups[None] = meta
            primary = groups[None] if meta is not None else next(iter(groups.values()))
            primary.by_window = groups
            meta = primary
        return inputs, positions, meta

    def _prepare(self, chunks: list[ScheduledChunk], is_first: bool, grouped: bool):
        positions, slot_mapping, token_ids, hiddens = [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        full = not grouped or self.has_full_layers
        offset = 0
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start_position, chunk.start_position + chunk.num_tokens
            positions.append(torch.arange(start, end))
            if is_first:
                token_ids.extend(seq.token_ids[start:end])
            else:
                hiddens.append(chunk.hidden)
            if not full:
                continue
            context_slots = self._slots(seq.block_table, 0, end)
            slot_mapping.append(context_slots[start:end])
            if chunk.is_decode:
                decode_tables.append(context_slots)
                decode_lens.append(end)
            else:
                prefills.append(PrefillSpan(offset, offset + chunk.num_tokens, end,
                                            None if start == 0 else context_slots))
            offset += chunk.num_tokens
        if is_first:
            inputs = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        else:
            inputs = torch.cat(hiddens).to(device=self.device, dtype=self.dtype)
        positions = torch.cat(positions).to(self.device)
        if not full:
            return inputs, positions, None
        meta = AttentionMetadata(slot_mapping=torch.cat(slot_mapping).to(self.device))
        if decode_tables:
            meta.num_decode_tokens = len(decode_tables)
            meta.decode_slot_table = pad_slot_rows(decode_tables).to(self.device)
            meta.decode_context_lens = torch.tensor(decode_lens, device=self.device)
            meta.decode_unpadded = min(decode_lens) == max(decode_lens)
        for span in prefills:
            if span.context_slots is not None:
                span.context_slots = span.context_slots.to(self.device)
        meta.prefills = prefills
        return inputs, positions, meta

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
