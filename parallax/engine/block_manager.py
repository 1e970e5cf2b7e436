"""Paged KV cache bookkeeping: fixed-size blocks, block tables, hash-based prefix caching.

A full block's hash chains the previous block's hash with its token ids, so equal hashes mean
equal prefixes. A block is registered for reuse only once its KV has been computed (chunked
prefill may leave a freshly allocated block half empty for a few steps). Freed blocks keep
their hash until they are handed out again, so a later request can still hit them.

Every stage of a pipeline keeps its own chain: the hashes depend on token ids only, so the
stages agree on which prefix a hash names (node/stage.py negotiates how much of it each still
holds). Eviction is LRU and comes before preemption: the free list holds every block with no
reference, cached or not; a block goes back to its end when its last reference drops (a
sequence's tail first, so its leading blocks stay longest) and a new block is always taken from
its front, so a cached block is reused only when it is the least recently used free one, and a
running request is preempted only when no free block, cached or not, is left.

Both managers below (`BlockManager` for a shard of full-attention layers, `GroupedBlockManager`
for one with sliding-window layers) have the interface the batcher and the engine use, `KVBlocks`:
admit a sequence with blocks for its first chunk (`can_allocate` / `allocate`), grow it for the
chunk that ends at `end` (`can_extend` / `extend`), free it (`deallocate`), and after a step
cache or release what was computed (`register_computed`).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

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

    def can_allocate(self, seq: Sequence, first_chunk_end: int | None = None) -> bool:
        return self.num_blocks_needed(seq) <= self.num_free_blocks

    def allocate(self, seq: Sequence, first_chunk_end: int | None = None) -> None:
        """Give seq blocks for all its current tokens (whatever its first chunk), reusing cached
        prefix blocks."""
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

    def allocate_prefix(self, seq: Sequence) -> int:
        """Later stages: pin the cached blocks of seq's longest cached prefix, and only those
        (no fresh blocks: the rest comes with the request's first chunk). Returns its tokens."""
        assert not seq.block_table
        for block_id in self._cached_prefix(seq):
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_block_ids.remove(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_cached_tokens = seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_cached_tokens

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids.append(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def can_extend(self, seq: Sequence, end: int, num_new_tokens: int = 1) -> bool:
        """Whether `extend` can cover seq's tokens and num_new_tokens more (a decode reserves
        its next token's slot). Full attention keeps every position, so the check is on all of
        seq's known tokens, whatever chunk `end` closes."""
        return self._blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def _blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = (len(seq) + num_new_tokens + self.block_size - 1) // self.block_size
        return max(0, needed - len(seq.block_table))

    def extend(self, seq: Sequence, end: int) -> None:
        """Grow seq's block table to cover all its known tokens (`end` included)."""
        for _ in range(self._blocks_to_append(seq, 0)):
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

    def for_window(self, window: int | None) -> BlockManager:
        """The pool of the layers with this sliding window: only full attention (None) here."""
        if window is not None:
            raise KeyError(f"no KV group for window {window}")
        return self


class WindowBlockManager:
    """Blocks of one sliding-window KV group (layers that only read the last `window` keys).

    A sequence's table for the group (`seq.window_tables[window]`) is indexed by block position
    like the full group's (entry i holds positions [i * block_size, (i + 1) * block_size)), but
    it only ever holds blocks the layers can still read: blocks are taken per scheduled chunk
    (never for the whole prompt at once), and after each step every block whose positions all lie
    before `next_query_position - window + 1` goes back to the pool and its entry becomes -1.
    A sequence therefore holds at most ceil((window - 1 + chunk) / block_size) + 1 blocks.
    No prefix caching here: a window's blocks are gone by the time a later request could reuse
    them. Keeping them would cost these layers full-context KV (the memory their windows save),
    and a hit on the full-attention group alone skips nothing: the windowed layers still need the
    KV of the last `window - 1` keys before the hit. So a shard with sliding-window layers never
    reports a cached prefix, and a pipeline holding one recomputes prompts from the start.
    """

    def __init__(self, num_blocks: int, block_size: int, window: int) -> None:
        if num_blocks <= 0:
            raise ValueError("the sliding-window KV cache has no blocks: raise the KV budget")
        self.block_size = block_size
        self.window = window
        self.num_blocks = num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_live_blocks(self, seq: Sequence) -> int:
        table = seq.window_tables.get(self.window, ())
        return len(table) - seq.window_released.get(self.window, 0)

    def _first_live_block(self, query_position: int) -> int:
        """First block holding a key a query at query_position (or later) can read."""
        return max(0, query_position - self.window + 1) // self.block_size

    def blocks_to_reserve(self, seq: Sequence, end: int) -> int:
        """New blocks seq needs so that positions up to `end` have slots."""
        table = seq.window_tables.get(self.window, ())
        return max(0, -(-end // self.block_size) - len(table))

    def can_reserve(self, seq: Sequence, end: int) -> bool:
        return self.blocks_to_reserve(seq, end) <= len(self.free_block_ids)

    def reserve(self, seq: Sequence, end: int) -> None:
        table = seq.window_tables.setdefault(self.window, [])
        for _ in range(self.blocks_to_reserve(seq, end)):
            table.append(self.free_block_ids.popleft())

    def release(self, seq: Sequence) -> None:
        """Free the blocks no query from seq.num_computed_tokens on will read."""
        table = seq.window_tables.get(self.window)
        if not table:
            return
        released = seq.window_released.get(self.window, 0)
        upto = min(self._first_live_block(seq.num_computed_tokens), len(table))
        for index in range(released, upto):
            self.free_block_ids.append(table[index])
            table[index] = -1
        if upto > released:
            seq.window_released[self.window] = upto

    def deallocate(self, seq: Sequence) -> None:
        table = seq.window_tables.pop(self.window, None)
        released = seq.window_released.pop(self.window, 0)
        if table:
            self.free_block_ids.extend(table[released:])


class GroupedBlockManager:
    """The KV groups of a shard with sliding-window layers: at most one full-attention group
    (a BlockManager over seq.block_table, prefix caching off: a prefix hit would skip tokens
    whose windowed KV the sliding groups never computed) and one WindowBlockManager per window.

    The KVBlocks interface, like BlockManager; the sliding groups take blocks per chunk (up to
    the first chunk's end on allocate, up to `end` on extend) where the full group takes every
    known token. No prefix caching: `allocate_prefix` holds nothing. Counters (num_blocks,
    num_free_blocks) are the primary group's: the full group, else the first window group.
    """

    def __init__(self, full: BlockManager | None, windows: list[WindowBlockManager]) -> None:
        assert windows
        self.full = full
        self.windows = windows
        self.primary = full if full is not None else windows[0]
        self.block_size = windows[0].block_size
        self.num_prefix_hit_tokens = 0

    def for_window(self, window: int | None) -> BlockManager | WindowBlockManager:
        """The pool of the layers with this sliding window (None: full attention)."""
        if window is None:
            if self.full is None:
                raise KeyError("this shard has no full-attention layers")
            return self.full
        for manager in self.windows:
            if manager.window == window:
                return manager
        raise KeyError(f"no KV group for window {window}")

    @property
    def num_blocks(self) -> int:
        return self.primary.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.primary.num_free_blocks

    def can_allocate(self, seq: Sequence, first_chunk_end: int) -> bool:
        if self.full is not None and not self.full.can_allocate(seq):
            return False
        return all(w.can_reserve(seq, first_chunk_end) for w in self.windows)

    def allocate(self, seq: Sequence, first_chunk_end: int) -> None:
        if self.full is not None:
            self.full.allocate(seq)
        else:
            seq.num_cached_tokens = seq.num_computed_tokens = 0
        for window in self.windows:
            window.reserve(seq, first_chunk_end)

    def allocate_prefix(self, seq: Sequence) -> int:
        """No prefix caching with sliding-window layers (see WindowBlockManager): holds 0."""
        return 0

    def can_extend(self, seq: Sequence, end: int, num_new_tokens: int = 1) -> bool:
        if self.full is not None and not self.full.can_extend(seq, end, num_new_tokens):
            return False
        return all(w.can_reserve(seq, end) for w in self.windows)

    def extend(self, seq: Sequence, end: int) -> None:
        if self.full is not None:
            self.full.extend(seq, end)
        for window in self.windows:
            window.reserve(seq, end)

    def deallocate(self, seq: Sequence) -> None:
        if self.full is not None:
            self.full.deallocate(seq)
        for window in self.windows:
            window.deallocate(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def register_computed(self, seq: Sequence) -> None:
        """After a step: the sliding groups drop the blocks that left every future window."""
        for window in self.windows:
            window.release(seq)


class KVBlocks(Protocol):
    """What the batcher and the engine use of a shard's KV blocks: BlockManager or
    GroupedBlockManager (see their docstrings for what each does with `first_chunk_end` and
    `end`: a sliding-window group takes blocks up to there, the full group for every token)."""

    block_size: int
    num_prefix_hit_tokens: int  # observable: prefill tokens skipped thanks to the cache

    @property
    def num_blocks(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    def can_allocate(self, seq: Sequence, first_chunk_end: int) -> bool: ...
    def allocate(self, seq: Sequence, first_chunk_end: int) -> None: ...
    def allocate_prefix(self, seq: Sequence) -> int: ...  # later stages: pin a cached prefix
    def can_extend(self, seq: Sequence, end: int, num_new_tokens: int = 1) -> bool: ...
    def extend(self, seq: Sequence, end: int) -> None: ...
    def deallocate(self, seq: Sequence) -> None: ...
    def register_computed(self, seq: Sequence) -> None: ...  # after a step: cache or release
    def for_window(self, window: int | None) -> BlockManager | WindowBlockManager: ...
