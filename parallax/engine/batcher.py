"""Continuous batching: which tokens of which sequences run in the next step.

Decodes go first (one token each), then prefill chunks under a per-step token budget, so a
long prompt never stalls running decodes. When KV blocks run out a decode preempts the most
recently admitted sequence (its KV is dropped and recomputed later) — never a crash.
On a stage that is not the first, the previous stage already chose the batch: this stage runs
whatever hidden states have arrived, in arrival order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from parallax.engine.block_manager import KVBlocks
from parallax.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """Tokens [start_position, start_position + num_tokens) of seq run this step."""

    seq: Sequence
    start_position: int
    num_tokens: int
    hidden: torch.Tensor | None = None  # inputs from the previous stage
    due: bool | None = None  # later stages: whether the head wants a token after this chunk

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1

    @property
    def completes_sequence(self) -> bool:
        """Whether a next token is due after this chunk.

        The first stage knows: the chunk reaches the sequence's last token. A later stage only
        knows the tokens that arrived so far (a prefill split in chunks, or a preempted request
        replayed with its generated tokens, ends there too), so the head says it per chunk."""
        if self.due is not None:
            return self.due
        return self.start_position + self.num_tokens == len(self.seq)


class Batcher:
    """The engine's batch scheduler (not the cluster scheduler of parallax/scheduler/): the
    waiting and running sequences of one stage and the chunks each step runs."""

    def __init__(
        self,
        block_manager: KVBlocks,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        is_first_stage: bool = True,
        query_prefix: bool = False,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.is_first_stage = is_first_stage
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # observable: how often KV pressure forced a recompute
        self.preempted_ids: list[str] = []  # since the last step; other stages must drop them
        self.out_of_blocks: list[Sequence] = []  # non-first stages: no room for arrived input
        # head of a pipeline: a sequence admitted with a cached prefix waits (awaiting_prefix)
        # until the later stages said how much of it they hold; these are the ones to ask
        self.query_prefix = query_prefix
        self.prefix_queries: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a new request behind every waiting one of equal or lower priority value."""
        priority = seq.sampling_params.priority
        index = next((i for i, s in enumerate(self.waiting)
                      if s.sampling_params.priority > priority), len(self.waiting))
        self.waiting.insert(index, seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table or seq.window_tables:
            self.block_manager.deallocate(seq)

    def schedule(self) -> list[ScheduledChunk]:
        if self.is_first_stage:
            return self._schedule_first_stage()
        return self._schedule_arrived_inputs()

    # ---- first stage -------------------------------------------------------------------

    def _schedule_first_stage(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        budget = self.max_num_batched_tokens
        ready = [s for s in self.running if not s.awaiting_token and not s.awaiting_prefix
                 and s.num_computed_tokens < len(s)]
        for seq in [s for s in ready if len(s) - s.num_computed_tokens == 1]:
            if len(chunks) >= self.max_num_seqs or budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING or not self._ensure_slots(seq, chunks, len(seq)):
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
            budget -= 1
        for seq in [s for s in ready if len(s) - s.num_computed_tokens > 1]:
            if len(chunks) >= self.max_num_seqs or budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue
            num_tokens = min(len(seq) - seq.num_computed_tokens, budget)
            # sliding-window groups take blocks per chunk; full attention has them all already
            if not self._ensure_slots(seq, chunks, seq.num_computed_tokens + num_tokens, 0):
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # the first chunk's end, were it to start at 0 (only sliding-window groups, which
            # cache no prefix, take blocks per chunk)
            first_chunk_end = min(len(seq), budget)
            if not self.block_manager.can_allocate(seq, first_chunk_end):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, first_chunk_end)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if self.query_prefix and seq.num_cached_tokens > 0:
                seq.awaiting_prefix = True  # runs once the later stages answered
                self.prefix_queries.append(seq)
                continue
            num_tokens = min(len(seq) - seq.num_computed_tokens, budget)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
        return chunks

    def _ensure_slots(
        self, seq: Sequence, scheduled: list[ScheduledChunk], end: int, num_new_tokens: int = 1
    ) -> bool:
        """Make room for seq's chunk ending at `end` (a decode: its next token too), preempting
        the newest other sequences if needed."""
        while not self.block_manager.can_extend(seq, end, num_new_tokens):
            busy = {id(c.seq) for c in scheduled}
            # a sequence waiting for a token or for its prefix answer has a message in flight
            victims = [s for s in self.running if id(s) not in busy and not s.awaiting_token
                       and not s.awaiting_prefix]
            victim = max(victims, key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is seq:
                return False
        self.block_manager.extend(seq, end)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.preempted_ids.append(seq.request_id)
        self.num_preemptions += 1

    # ---- later stages ------------------------------------------------------------------

    def _schedule_arrived_inputs(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        budget = self.max_num_batched_tokens
        while self.waiting:  # first sight of a request on this stage: blocks for its input
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if not seq.pending_inputs or len(chunks) >= self.max_num_seqs:
                continue
            pending = seq.pending_inputs[0]
            if chunks and budget < len(pending.token_ids):
                break
            end = pending.start_position + len(pending.token_ids)
            if not self.block_manager.can_extend(seq, end, 0):
                self.out_of_blocks.append(seq)
                continue
            self.block_manager.extend(seq, end)
            seq.pending_inputs.pop(0)
            chunks.append(ScheduledChunk(seq, pending.start_position, len(pending.token_ids),
                                         pending.hidden, pending.due))
            budget -= len(pending.token_ids)
        return chunks
