"""Attention over a paged KV cache, in plain torch (CPU and CUDA alike).

The batch is flat: all new tokens of all scheduled sequences, decode tokens first (one each),
then the prefill chunks. Decodes run as one padded SDPA call; each prefill chunk runs alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One prefill chunk: flat tokens [token_start, token_end) attending to context_len keys."""

    token_start: int
    token_end: int
    context_len: int
    # Slots of all context_len keys (cached prefix + this chunk); None when the chunk is the
    # whole context, so the fresh k/v can be used directly with a causal mask.
    context_slots: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, shared by every layer of the shard."""

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decode_tokens: int = 0
    decode_slot_table: torch.Tensor | None = None  # [B, max_ctx] slots, padded with 0
    decode_context_lens: torch.Tensor | None = None  # [B]
    prefills: list[PrefillSpan] = field(default_factory=list)
    _decode_masks: dict = field(default_factory=dict, repr=False)

    def decode_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """[B, 1, 1, max_ctx] bool: key j visible to the decode query at position len-1."""
        if sliding_window not in self._decode_masks:
            lens = self.decode_context_lens
            key_positions = torch.arange(self.decode_slot_table.shape[1], device=lens.device)
            mask = key_positions[None, :] < lens[:, None]
            if sliding_window is not None:
                mask &= key_positions[None, :] > (lens[:, None] - 1 - sliding_window)
            self._decode_masks[sliding_window] = mask[:, None, None, :]
        return self._decode_masks[sliding_window]


def causal_mask(
    num_queries: int, context_len: int, device, sliding_window: int | None = None
) -> torch.Tensor:
    """[q, ctx] bool for queries at the last num_queries positions of the context."""
    query_positions = torch.arange(context_len - num_queries, context_len, device=device)
    key_positions = torch.arange(context_len, device=device)
    mask = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        mask &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return mask


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Store this step's k/v in the cache, then attend. q: [T, H, D]; k, v: [T, KVH, D].

    k_cache / v_cache: [num_slots, KVH, D]. Returns [T, H, D].
    """
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    out = torch.empty_like(q)
    num_decode = meta.num_decode_tokens
    if num_decode:
        table = meta.decode_slot_table
        # [B, ctx, KVH, D] -> [B, KVH, ctx, D]
        keys = k_cache[table].transpose(1, 2)
        values = v_cache[table].transpose(1, 2)
        queries = q[:num_decode].unsqueeze(2)  # [B, H, 1, D]
        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.decode_mask(sliding_window), scale=scale,
            enable_gqa=True,
        )
        out[:num_decode] = attended.squeeze(2)
    for span in meta.prefills:
        queries = q[span.token_start : span.token_end].transpose(0, 1).unsqueeze(0)
        if span.context_slots is None and sliding_window is None:
            keys = k[span.token_start : span.token_end].transpose(0, 1).unsqueeze(0)
            values = v[span.token_start : span.token_end].transpose(0, 1).unsqueeze(0)
            attended = F.scaled_dot_product_attention(
                queries, keys, values, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            if span.context_slots is None:
                keys = k[span.token_start : span.token_end]
                values = v[span.token_start : span.token_end]
            else:
                keys = k_cache[span.context_slots]
                values = v_cache[span.context_slots]
            mask = causal_mask(
                span.token_end - span.token_start, span.context_len, q.device, sliding_window
            )
            attended = F.scaled_dot_product_attention(
                queries, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
                attn_mask=mask, scale=scale, enable_gqa=True,
            )
        out[span.token_start : span.token_end] = attended.squeeze(0).transpose(0, 1)
    return out
