"""Attention over a paged KV cache, in plain torch (CPU and CUDA alike).

The batch is flat: all new tokens of all scheduled sequences, decode tokens first (one each),
then the prefill chunks. Decodes run as one padded SDPA call; each prefill chunk runs alone.

Sliding-window layers gather only the keys inside their window (never the whole context), so
blocks that fell out of the window are not read. Attention sinks (gpt-oss: one learned logit per
head that joins the softmax denominator and contributes no value) run through SDPA too: one
extra key with a zero vector and a zero value, whose score is set to the sink by a float mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from parallax.models import fused_ops


@dataclass
class PrefillSpan:
    """One prefill chunk: flat tokens [token_start, token_end) attending to context_len keys."""

    token_start: int
    token_end: int
    context_len: int
    # Slots of all context_len keys (cached prefix + this chunk); None when the chunk is the
    # whole context, so the fresh k/v can be used directly with a causal mask.
    context_slots: torch.Tensor | None
    # Position of context_slots[0]: a sliding-window KV group only lists the keys its window
    # reads (the blocks before were released).
    context_start: int = 0


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, shared by every layer of the shard."""

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decode_tokens: int = 0
    decode_slot_table: torch.Tensor | None = None  # [B, max_ctx] slots, padded with own slots
    decode_context_lens: torch.Tensor | None = None  # [B]
    # Every decode row fills the whole table (no padding): with full attention no key is masked
    decode_unpadded: bool = False
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Sliding-window KV group: ([B, W] slots of each decode's last keys, right-aligned, and
    # their [B, 1, 1, W] validity) instead of decode_slot_table.
    window_decode: tuple[torch.Tensor, torch.Tensor] | None = None
    # Shards with several KV groups: the metadata of each group by window (None: full
    # attention); paged_attention picks its layer's.
    by_window: dict | None = field(default=None, repr=False)
    _decode_masks: dict = field(default_factory=dict, repr=False)

    def decode_mask(self, sliding_window: int | None = None) -> torch.Tensor | None:
        """[B, 1, 1, max_ctx] bool: key j visible to the decode query at position len-1; None
        when every key is (SDPA without a mask is the cheaper call)."""
        width = self.decode_slot_table.shape[1]
        if self.decode_unpadded and (sliding_window is None or width <= sliding_window):
            return None
        if sliding_window not in self._decode_masks:
            lens = self.decode_context_lens
            key_positions = torch.arange(self.decode_slot_table.shape[1], device=lens.device)
            mask = key_positions[None, :] < lens[:, None]
            if sliding_window is not None:
                mask &= key_positions[None, :] > (lens[:, None] - 1 - sliding_window)
            self._decode_masks[sliding_window] = mask[:, None, None, :]
        return self._decode_masks[sliding_window]

    def decode_window(self, sliding_window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last sliding_window slots of each decode row and their validity mask.

        Returns ([B, W] slots, [B, 1, 1, W] bool): a windowed layer gathers W keys, not the
        whole context, so blocks that left its window are never read.
        """
        key = ("window", sliding_window)
        if key not in self._decode_masks:
            lens = self.decode_context_lens
            offsets = torch.arange(sliding_window, device=lens.device)
            positions = lens[:, None] - sliding_window + offsets[None, :]  # [B, W]
            valid = positions >= 0
            slots = self.decode_slot_table.gather(1, positions.clamp(min=0))
            self._decode_masks[key] = (slots, valid[:, None, None, :])
        return self._decode_masks[key]


def causal_mask(
    num_queries: int,
    context_len: int,
    device,
    sliding_window: int | None = None,
    key_start: int = 0,
) -> torch.Tensor:
    """[q, ctx - key_start] bool for queries at the last num_queries positions of the context.

    Keys are the context positions [key_start, context_len).
    """
    query_positions = torch.arange(context_len - num_queries, context_len, device=device)
    key_positions = torch.arange(key_start, context_len, device=device)
    mask = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        mask &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return mask


def window_start(first_query_position: int, sliding_window: int | None) -> int:
    """First key position a query at first_query_position (or later) can see."""
    if sliding_window is None:
        return 0
    return max(0, first_query_position - sliding_window + 1)


SINK_BIAS_BYTES = 64 * 2**20
"""Largest per-head score bias the sink path materialises at once (queries are chunked)."""


def attend(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA with GQA. queries [B, H, q, D]; keys, values [B, KVH, k, D]; mask bool
    broadcastable to [B, H, q, k], or None for plain causal. Returns [B, H, q, D].

    With sinks [H] the softmax denominator gains exp(sink_h): an extra all-zero key (score 0)
    whose float-mask entry is sink_h, paired with an all-zero value. That bias is per head,
    [B, H, q, k + 1], so long prefills run in query chunks of at most SINK_BIAS_BYTES.
    """
    if sinks is None:
        if mask is None:
            return F.scaled_dot_product_attention(
                queries, keys, values, is_causal=True, scale=scale, enable_gqa=True
            )
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    batch, num_heads, num_queries, _ = queries.shape
    num_keys = keys.shape[2]
    if mask is None:
        mask = causal_mask(num_queries, num_keys, queries.device)
    mask = mask.expand(batch, num_heads, num_queries, num_keys)
    zero = keys.new_zeros(keys.shape[0], keys.shape[1], 1, keys.shape[3])  # [B, KVH, 1, D]
    keys, values = torch.cat((keys, zero), dim=2), torch.cat((values, zero), dim=2)
    sink_column = sinks.to(queries.dtype).view(1, num_heads, 1, 1)
    row_bytes = batch * num_heads * (num_keys + 1) * queries.element_size()
    rows = max(1, SINK_BIAS_BYTES // row_bytes)
    out = []
    for start in range(0, num_queries, rows):
        part = mask[:, :, start : start + rows]  # [B, H, r, k]
        bias = torch.zeros(part.shape, dtype=queries.dtype, device=queries.device)
        bias.masked_fill_(~part, float("-inf"))
        bias = torch.cat((bias, sink_column.expand(batch, num_heads, part.shape[2], 1)), dim=-1)
        out.append(F.scaled_dot_product_attention(
            queries[:, :, start : start + rows], keys, values, attn_mask=bias, scale=scale,
            enable_gqa=True,
        ))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per row: q [B, H, D] against the keys in slots table [B, ctx]; mask
    [B, 1, 1, ctx] bool, or None when all are visible. Returns [B, H, D]."""
    batch, width = table.shape
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    slots = table.reshape(-1)
    # [B, ctx, KVH, D] -> [B, KVH, ctx, D]
    keys = k_cache.index_select(0, slots).view(batch, width, kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, slots).view(batch, width, kv_heads, head_dim).transpose(1, 2)
    if sinks is not None:  # None means all visible to attend's sink path too
        return attend(q.unsqueeze(2), keys, values, mask, scale, sinks).squeeze(2)
    # GQA as rows: the H / KVH query heads that share a KV head are that head's query rows
    # (one decode's mask is the same for all of them), so SDPA needs no K/V expansion.
    queries = q.reshape(batch, kv_heads, q.shape[1] // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, q.shape[1], head_dim)


def decode_keys(meta: AttentionMetadata, sliding_window: int | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decode rows' key slots and visibility mask for decode_attention."""
    if meta.window_decode is not None:
        return meta.window_decode
    if sliding_window is not None and meta.decode_slot_table.shape[1] > sliding_window:
        return meta.decode_window(sliding_window)
    return meta.decode_slot_table, meta.decode_mask(sliding_window)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Store this step's k/v in the cache, then attend. q: [T, H, D]; k, v: [T, KVH, D].

    k_cache / v_cache: [num_slots, KVH, D]; sinks: optional [H] logits. Returns [T, H, D].
    """
    if meta.by_window is not None:
        meta = meta.by_window[sliding_window]
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    num_decode = meta.num_decode_tokens
    if num_decode:
        decoded = None
        if meta.window_decode is None:  # the slot table lists every row's whole context
            decoded = fused_ops.decode_attention(
                q[:num_decode], k_cache, v_cache, meta.decode_slot_table,
                meta.decode_context_lens, scale, sliding_window, sinks)
        if decoded is None:
            decoded = decode_attention(q[:num_decode], k_cache, v_cache,
                                       *decode_keys(meta, sliding_window), scale, sinks)
        if not meta.prefills:  # a pure decode step: no output buffer to copy into
            return decoded
    out = torch.empty_like(q)
    if num_decode:
        out[:num_decode] = decoded
    for span in meta.prefills:
        num_queries = span.token_end - span.token_start
        queries = q[span.token_start : span.token_end].transpose(0, 1).unsqueeze(0)
        if span.context_slots is None and sliding_window is None:
            keys = k[span.token_start : span.token_end]
            values = v[span.token_start : span.token_end]
            mask = None  # plain causal
        else:
            key_start = window_start(span.context_len - num_queries, sliding_window)
            if span.context_slots is None:  # the chunk is the whole context: fresh k/v
                keys = k[span.token_start + key_start : span.token_end]
                values = v[span.token_start + key_start : span.token_end]
            else:
                keys = k_cache[span.context_slots[key_start - span.context_start :]]
                values = v_cache[span.context_slots[key_start - span.context_start :]]
            mask = causal_mask(num_queries, span.context_len, q.device, sliding_window,
                               key_start)
        # [k, KVH, D] -> [1, KVH, k, D]
        keys, values = keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)
        attended = attend(queries, keys, values, mask, scale, sinks)
        out[span.token_start : span.token_end] = attended.squeeze(0).transpose(0, 1)
    return out
