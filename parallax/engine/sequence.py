"""A request as one stage sees it: its token ids, KV blocks and progress."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch

from parallax.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # admitted, no KV blocks yet (or preempted)
    RUNNING = enum.auto()  # holds KV blocks
    FINISHED = enum.auto()


@dataclass
class PendingInput:
    """Hidden states from the previous stage for tokens [start_position, start + len)."""

    token_ids: list[int]
    start_position: int
    hidden: torch.Tensor  # [len(token_ids), hidden_size]
    due: bool  # the head expects a token after this chunk (it ends its known sequence)


class Sequence:
    """Token ids (prompt + generated as known so far) and this stage's KV progress."""

    _arrival = itertools.count()

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        block_size: int,
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_initial_tokens = len(prompt_token_ids)  # what the request brought (prefill)
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.status = SequenceStatus.WAITING
        self.arrival = next(self._arrival)
        self.block_table: list[int] = []  # full-attention KV group (the only one of most models)
        # Sliding-window KV groups, by window: position-indexed tables whose leading
        # window_released[window] entries were released (-1); see WindowBlockManager.
        self.window_tables: dict[int, list[int]] = {}
        self.window_released: dict[int, int] = {}
        self.num_computed_tokens = 0  # tokens whose KV is in this stage's cache
        self.num_cached_tokens = 0  # of those, reused from the prefix cache
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.last_block_hash: int | None = None
        self.awaiting_token = False  # head of a pipeline: a token is on its way back
        # head of a pipeline: its cached prefix waits for the later stages' answer to a
        # LinkPrefixQuery (how much of it they hold) before it runs
        self.awaiting_prefix = False
        # later stages: blocks of a cached prefix pinned by a LinkPrefixQuery, waiting for the
        # request's first chunk (its sampling params are not known yet)
        self.reserved = False
        self.pending_inputs: list[PendingInput] = []  # non-first stages
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        self.grammar = None  # last stage, constrained requests: grammar.RequestGrammar
        if sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling_params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    def block_token_ids(self, index: int) -> list[int]:
        return self.token_ids[index * self.block_size : (index + 1) * self.block_size]
