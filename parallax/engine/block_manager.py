"""Paged KV cache bookkeeping: fixed-size blocks, block tables, hash-based prefix caching.

A full block's hash chains the previous block's hash with its token ids, so equal hashes mean
equal prefixes. A block is registered for reuse only once its KV has been computed (chunked
prefill may leave a freshly allocated block half empty for a few steps). Freed blocks keep
their hash until they are handed out again, so a later request can still hit them.
"""

from __future__ import annotations

from collections import deque

from parallax.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(previous: int | None, token_ids: list[int] | tuple[int, ...]) -> int:
    return hash((previous, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError("the KV cache has no blocks: raise the KV memory budget")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.num_prefix_hit_tokens = 0  # observable: prefill tokens skipped thanks to the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of seq's full blocks."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        previous = None
        for index in range(len(seq) // self.block_size):
            token_ids = seq.block_token_ids(index)
            previous = chain_hash(previous, token_ids)
            block_id = self.hash_to_block_id.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids):
                break
            hits.append(block_id)
        return hits

    def num_blocks_needed(self, seq: Sequence) -> int:
        hits = self._cached_prefix(seq)
        reusable_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks - len(hits) + reusable_free

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_blocks_needed(seq) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its current tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_block_ids.remove(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(seq.num_blocks - len(hits)):
            seq.block_table.append(self._take_free_block())
        # At least one token must run through the model to produce logits / hidden output.
        cached = min(len(hits) * self.block_size, len(seq) - 1)
        seq.num_cached_tokens = seq.num_computed_tokens = cached
        self.num_prefix_hit_tokens += cached

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids.append(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        return self._blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def _blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = (len(seq) + num_new_tokens + self.block_size - 1) // self.block_size
        return max(0, needed - len(seq.block_table))

    def append_slots(self, seq: Sequence, num_new_tokens: int = 0) -> None:
        """Grow seq's block table to cover its tokens (plus num_new_tokens not yet appended)."""
        for _ in range(self._blocks_to_append(seq, num_new_tokens)):
            seq.block_table.append(self._take_free_block())

    def register_computed(self, seq: Sequence) -> None:
        """Hash the full blocks whose KV is now computed so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        for index in range(seq.num_hashed_blocks, seq.num_computed_tokens // self.block_size):
            token_ids = seq.block_token_ids(index)
            seq.last_block_hash = chain_hash(seq.last_block_hash, token_ids)
            seq.num_hashed_blocks = index + 1
            block = self.blocks[seq.block_table[index]]
            if block.hash is None:
                block.hash, block.token_ids = seq.last_block_hash, tuple(token_ids)
                self.hash_to_block_id.setdefault(block.hash, block.block_id)
