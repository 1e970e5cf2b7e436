"""One stage's engine: add requests, step (schedule -> run -> postprocess), abort.

The same class serves every position in a pipeline:
- first and last (a whole model): tokens in, tokens out, decoding loops locally;
- first, not last: tokens in, hidden states out; the sampled token comes back by append_token;
- later stages: hidden states in (add_hidden), hidden states or sampled tokens out.

Prefix caching works on every stage (each keeps its own hash-chained blocks). In a pipeline the
head cannot run a cached prefix until it knows the later stages hold it too, so a request the
head admits with a cached prefix waits (`take_prefix_queries`) while node/stage.py asks them:
each later stage pins what it holds (`reserve_prefix`) and the smallest answer comes back
(`resume_prefix`). Every stage then starts the request at that position; the head recomputes its
own layers for the part of its hit a later stage lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from parallax.engine.batcher import Batcher, ScheduledChunk
from parallax.engine.block_manager import (
    BlockManager,
    GroupedBlockManager,
    KVBlocks,
    WindowBlockManager,
)
from parallax.engine.grammar import GrammarMask, GrammarMasker
from parallax.engine.model_runner import ModelRunner, kv_bytes_per_token, layer_windows
from parallax.engine.sampler import RowFailure, apply_grammar_mask, sample, token_logprobs
from parallax.engine.sampling_params import SamplingParams, check_prompt_length
from parallax.engine.sequence import PendingInput, Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    kv_memory_bytes: int = 256 * 2**20
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class PrefixQuery:
    """Head of a pipeline: ask the later stages how much of `token_ids` (the full blocks of the
    head's cached prefix of `request_id`) their own caches hold."""

    request_id: str
    token_ids: list[int]


class StepFailed(RuntimeError):
    """The model forward of one batch raised: only the requests of that batch are lost.

    Requests outside the batch are untouched (their KV cache was not written this step), so the
    executor fails `request_ids` and goes on.
    """

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids


@dataclass
class StepOutput:
    """What one request produced in a step on this stage."""

    request_id: str
    token_id: int | None = None  # last stage: the sampled token
    hidden: torch.Tensor | None = None  # other stages: [num_tokens, hidden] for the next stage
    token_ids: list[int] | None = None  # the input token ids the hidden states belong to
    start_position: int = 0
    due: bool = False  # hidden outputs: a token is due once the last stage has run them
    # hidden outputs: the request's first chunk on this stage (it starts the request on the next
    # stage: at 0, or after the prefix every stage holds), with what the next stage needs then
    first: bool = False
    sampling_params: SamplingParams | None = None  # first hidden outputs
    num_prompt_tokens: int = 0  # first hidden outputs
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    logprob: float | None = None  # last stage, when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (id, logprob), most likely first


class Engine:
    def __init__(
        self, model: torch.nn.Module, config: EngineConfig, eos_token_ids: list[int] | tuple = ()
    ) -> None:
        self.model = model
        self.config = config
        self.is_first, self.is_last = model.is_first, model.is_last
        self.eos_token_ids = frozenset(eos_token_ids)
        model_len = getattr(model.config, "max_position_embeddings", None) or 8192
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        windows = [w for w in layer_windows(model) if w is not None]
        self.has_full_attention = None in layer_windows(model)
        if not windows:  # every dense model: one KV group, as it always was
            per_block = kv_bytes_per_token(model, config.dtype) * config.block_size
            num_blocks = config.kv_memory_bytes // per_block
            if num_blocks < 1:
                raise ValueError(f"KV memory {config.kv_memory_bytes} bytes is below one block "
                                 f"({per_block} bytes)")
            # every stage caches; in a pipeline the stages agree on the prefix to skip
            self.block_manager: KVBlocks = BlockManager(num_blocks, config.block_size,
                                              config.enable_prefix_caching)
            window_blocks = None
        else:
            num_blocks, window_blocks = self._split_kv_budget(windows)
            self.block_manager = GroupedBlockManager(
                BlockManager(num_blocks, config.block_size, enable_prefix_caching=False)
                if self.has_full_attention else None,
                [WindowBlockManager(window_blocks[w], config.block_size, w) for w in windows],
            )
        self.batcher = Batcher(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
            is_first_stage=self.is_first, query_prefix=self.is_first and not self.is_last)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.device,
                                  config.dtype, window_blocks)
        self.sequences: dict[str, Sequence] = {}
        # the stage that samples constrains the requests that carry a grammar
        self.grammar = GrammarMasker(sorted(self.eos_token_ids)) if self.is_last else None
        self.num_steps = 0
        # tokens this stage computed in prefill (whatever a request brought: prompt, resumed
        # ids; a later stage counts the prompt the head announced) and in decode steps, since
        # this engine started
        self.num_prefill_tokens = 0
        self.num_decode_tokens = 0
        # head of a pipeline: tokens of its own cached prefixes it ran again because a later
        # stage had evicted them (see resume_prefix)
        self.num_prefix_recomputed_tokens = 0

    def _split_kv_budget(self, windows: list[int]) -> tuple[int, dict[int, int]]:
        """Blocks of the full-attention group and of each sliding-window group.

        The rule (all in blocks of block_size tokens):
        - A window-W group never needs more than
              need_W = max_num_seqs * (ceil((W - 1) / block_size) + 2)
                       + ceil(max_num_batched_tokens / block_size)
          blocks: after a step each sequence keeps the blocks of its last W - 1 keys, and the
          chunks of one step add at most max_num_batched_tokens tokens.
        - It gets min(need_W, legacy) blocks, where legacy = budget // (KV bytes per token of
          all layers * block_size) is what every layer had when all layers shared one pool; and
          at least one sequence's worth, ceil((W - 1 + max_num_batched_tokens) / block_size) + 1.
        - The full-attention group gets every byte left. So no group ever has fewer blocks than
          under one shared pool, and the memory the windows do not need goes to full attention.
          Without full-attention layers the rest of the budget stays unallocated.
        """
        config, size = self.config, self.config.block_size
        chunk = config.max_num_batched_tokens
        legacy = config.kv_memory_bytes // (kv_bytes_per_token(self.model, config.dtype) * size)
        block_bytes = {w: kv_bytes_per_token(self.model, config.dtype, w) * size
                       for w in [None, *windows]}
        window_blocks = {}
        for w in windows:
            need = config.max_num_seqs * (-(-(w - 1) // size) + 2) + -(-chunk // size)
            floor = -(-(w - 1 + chunk) // size) + 1
            window_blocks[w] = max(min(need, legacy), floor)
        left = config.kv_memory_bytes - sum(window_blocks[w] * block_bytes[w] for w in windows)
        num_blocks = left // block_bytes[None] if self.has_full_attention else 0
        if left < 0 or (self.has_full_attention and num_blocks < 1):
            raise ValueError(f"KV memory {config.kv_memory_bytes} bytes cannot hold one sequence's "
                             f"sliding-window blocks and one full-attention block")
        return num_blocks, window_blocks

    def block_manager_for(self, window: int | None) -> BlockManager | WindowBlockManager:
        """The block pool of the layers with this sliding window (None: full attention)."""
        return self.block_manager.for_window(window)

    # ---- input ---------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
        num_resumed_tokens: int = 0,
    ) -> None:
        """First stage: admit a request (it waits until blocks and batch room allow).

        `num_resumed_tokens`: the last ones of `prompt_token_ids` were generated already (a
        replayed request): they are prefilled with the prompt but count as generated.
        """
        if not self.is_first:
            raise RuntimeError("add_request is for the first stage; later stages use add_hidden")
        self._check_new(request_id, prompt_token_ids, sampling_params)
        if not 0 <= num_resumed_tokens < len(prompt_token_ids):
            raise ValueError(f"{num_resumed_tokens} resumed tokens for a prompt of "
                             f"{len(prompt_token_ids)}")
        seq = Sequence(request_id, prompt_token_ids, sampling_params, self.config.block_size)
        seq.num_prompt_tokens -= num_resumed_tokens
        self._admit(seq)

    def _admit(self, seq: Sequence) -> None:
        self.sequences[seq.request_id] = seq
        self.batcher.add(seq)
        if self.grammar is not None and seq.sampling_params.grammar:
            self.grammar.admit(seq)

    def set_grammar_vocab(self, tokenizer_json: str) -> None:
        """The model's tokenizer (`tokenizer.json` text) for constrained decoding; ignored on
        stages that do not sample."""
        if self.grammar is not None:
            self.grammar.set_vocab(tokenizer_json)

    def _check_new(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt:
            raise ValueError("the prompt has no tokens")
        check_prompt_length(len(prompt), self.max_model_len)
        needed = -(-(len(prompt) + 1) // self.config.block_size)
        if self.has_full_attention and needed > self.block_manager.num_blocks:
            raise ValueError(
                f"the prompt needs {needed} KV blocks but the cache has "
                f"{self.block_manager.num_blocks}; raise the KV memory budget"
            )
        params.validate()

    def add_hidden(
        self,
        request_id: str,
        token_ids: list[int],
        start_position: int,
        hidden: torch.Tensor,
        sampling_params: SamplingParams | None = None,
        num_prompt_tokens: int | None = None,
        due: bool | None = None,
    ) -> None:
        """Later stages: hidden states for tokens [start_position, +len) of a request.

        The first chunk of a request carries its sampling params and prompt length.
        """
        seq = self.sequences.get(request_id)
        if seq is None or seq.reserved:
            if sampling_params is None or num_prompt_tokens is None:
                raise ValueError(f"first input of {request_id!r} lacks sampling params")
            sampling_params.validate()  # they came over the wire from the head
            seq = self._start_later(request_id, start_position, sampling_params, seq)
            seq.num_prompt_tokens = seq.num_initial_tokens = num_prompt_tokens
            self._admit(seq)
        if start_position != len(seq.token_ids):
            raise ValueError(
                f"{request_id!r}: input at position {start_position}, expected {len(seq)}"
            )
        seq.token_ids.extend(token_ids)
        if due is None:  # no word from the head: due when the known prompt is complete
            end = start_position + len(token_ids)
            due = end == len(seq.token_ids) and end >= seq.num_prompt_tokens
        seq.pending_inputs.append(PendingInput(list(token_ids), start_position, hidden, due))

    def _start_later(self, request_id: str, start_position: int, params: SamplingParams,
                     reserved: Sequence | None) -> Sequence:
        """A later stage's sequence for a request's first chunk: empty (a chunk at 0), or the
        first `start_position` tokens of the prefix a LinkPrefixQuery reserved."""
        seq = Sequence(request_id, [], params, self.config.block_size)
        if start_position == 0:
            if reserved is not None:
                self.abort(request_id)  # the head restarts from scratch after all
            return seq
        if reserved is None or start_position > len(reserved):
            held = 0 if reserved is None else len(reserved)
            raise ValueError(f"{request_id!r} starts at {start_position} but this stage holds "
                             f"{held} tokens of its prefix")
        seq.token_ids = reserved.token_ids[:start_position]
        # pinned: the KV of [0, start) is cached here (blocks past `start` are rewritten in
        # place with the same tokens' KV)
        seq.block_table, reserved.block_table = reserved.block_table, []
        seq.num_cached_tokens = seq.num_computed_tokens = start_position
        self.block_manager.num_prefix_hit_tokens += start_position
        return seq

    # ---- prefix negotiation (pipelines) --------------------------------------------------

    def take_prefix_queries(self) -> list[PrefixQuery]:
        """Head: requests just admitted with a cached prefix, waiting for the later stages to
        say how much of it they hold (answer with resume_prefix)."""
        queries, self.batcher.prefix_queries = self.batcher.prefix_queries, []
        size = self.config.block_size
        return [PrefixQuery(seq.request_id,
                            seq.token_ids[: -(-seq.num_cached_tokens // size) * size])
                for seq in queries if seq.awaiting_prefix]

    def resume_prefix(self, request_id: str, num_tokens: int) -> None:
        """Head: the later stages hold `num_tokens` of the request's prefix (the smallest of
        their answers; 0 when asking failed): run from there. The head's own KV of the part it
        holds beyond that stays pinned and is recomputed in place (same tokens, same
        positions: same values), so its hidden states can go to the stages that lost it."""
        seq = self.sequences.get(request_id)
        if seq is None or not seq.awaiting_prefix:
            return  # aborted meanwhile, or a late answer after a timeout
        start = max(0, min(num_tokens, seq.num_cached_tokens))
        lost = seq.num_cached_tokens - start
        self.block_manager.num_prefix_hit_tokens -= lost
        self.num_prefix_recomputed_tokens += lost
        seq.num_cached_tokens = seq.num_computed_tokens = start
        seq.num_hashed_blocks, seq.last_block_hash = 0, None
        seq.awaiting_prefix = False

    def reserve_prefix(self, request_id: str, token_ids: list[int]) -> int:
        """Later stage: pin the longest prefix of `token_ids` this stage's cache holds (full
        blocks) for the request's first chunk, replacing any stale state. Returns its tokens."""
        if self.is_first:
            raise RuntimeError("reserve_prefix is for later stages")
        self.abort(request_id)
        seq = Sequence(request_id, list(token_ids), SamplingParams(), self.config.block_size)
        held = self.block_manager.allocate_prefix(seq)  # 0 with sliding-window layers
        if held == 0:
            return 0
        del seq.token_ids[held:]
        seq.reserved = True
        self.sequences[request_id] = seq
        return held

    def append_token(self, request_id: str, token_id: int, finished: bool = False,
                     finish_reason: str | None = None) -> None:
        """First stage of a longer pipeline: the token sampled by the last stage came back."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return  # aborted meanwhile
        seq.awaiting_token = False
        seq.token_ids.append(token_id)
        if finished:
            self._finish(seq, finish_reason or "stop")

    def has_request(self, request_id: str) -> bool:
        """Whether this stage holds the request (admitted, reserved or running)."""
        return request_id in self.sequences

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks. Returns whether it was known."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return False
        self._finish(seq, "abort")
        return True

    # ---- step ----------------------------------------------------------------------------

    def has_work(self) -> bool:
        if self.batcher.waiting:
            return True
        return any(
            (not s.awaiting_token and not s.awaiting_prefix and s.num_computed_tokens < len(s))
            or s.pending_inputs for s in self.batcher.running
        )

    def step(self) -> list[StepOutput]:
        """schedule -> run -> postprocess. Returns one output per request that produced one."""
        chunks = self.batcher.schedule()
        outputs = self._drain_out_of_blocks()
        if not chunks:
            return outputs
        chunks.sort(key=lambda c: not c.is_decode)  # attention metadata wants decodes first
        # the grammar masks of the rows about to be sampled are filled while the forward runs
        masks = None if self.grammar is None else self.grammar.start(
            [c.seq for c in chunks if c.completes_sequence])
        try:
            hidden, logits, due = self.runner.run(chunks, self.is_first, self.is_last)
        except Exception as exc:  # noqa: BLE001 - handed up with the batch's request ids
            raise StepFailed([c.seq.request_id for c in chunks], exc) from exc
        finally:
            mask = None if self.grammar is None else self.grammar.wait(masks)
        self.num_steps += 1
        for chunk in chunks:
            chunk.seq.num_computed_tokens = chunk.start_position + chunk.num_tokens
            self.block_manager.register_computed(chunk.seq)
            end = chunk.start_position + chunk.num_tokens
            prefill = max(0, min(end, chunk.seq.num_initial_tokens) - chunk.start_position)
            self.num_prefill_tokens += prefill
            self.num_decode_tokens += chunk.num_tokens - prefill
        if not self.is_last:
            outputs.extend(self._hidden_outputs(chunks, hidden))
        elif due:
            outputs.extend(self._sample_outputs([chunks[i] for i in due], logits, mask))
        return outputs

    def _hidden_outputs(self, chunks: list[ScheduledChunk], hidden: torch.Tensor):
        offset = 0
        for chunk in chunks:
            rows = hidden[offset : offset + chunk.num_tokens]
            offset += chunk.num_tokens
            seq = chunk.seq
            if self.is_first and chunk.completes_sequence:
                seq.awaiting_token = True
            first = chunk.start_position == seq.num_cached_tokens
            yield StepOutput(
                seq.request_id,
                hidden=rows,
                token_ids=seq.token_ids[chunk.start_position : chunk.start_position + chunk.num_tokens],
                start_position=chunk.start_position,
                due=chunk.completes_sequence,
                first=first,
                sampling_params=seq.sampling_params if first else None,
                num_prompt_tokens=seq.num_prompt_tokens if first else 0,
            )

    def _sample_outputs(self, chunks: list[ScheduledChunk], logits: torch.Tensor,
                        mask: GrammarMask | None = None):
        seqs = [c.seq for c in chunks]
        params = [s.sampling_params for s in seqs]
        generated = [s.generated_token_ids for s in seqs]
        logits = apply_grammar_mask(logits, mask)
        token_ids = sample(logits, params, generated, [s.generator for s in seqs])
        if mask is not None:  # rows whose grammar cannot go on fail alone
            for row, message in mask.errors.items():
                token_ids[row] = RowFailure(message)
        logprobs = token_logprobs(logits, params, generated, token_ids)
        for seq, token_id, lp in zip(seqs, token_ids, logprobs, strict=True):
            if isinstance(token_id, RowFailure):  # this request fails, its neighbours go on
                logger.warning("request %s failed in sampling: %s", seq.request_id,
                               token_id.message)
                self._finish(seq, "error")
                yield StepOutput(seq.request_id, finished=True, finish_reason="error",
                                 error=token_id.message)
                continue
            reason = self._finish_reason(seq, token_id)
            if seq.grammar is not None and seq.grammar.accept(token_id) and reason is None:
                reason = "stop"  # the grammar is complete: nothing but EOS could follow
            output = StepOutput(seq.request_id, token_id=token_id, finished=reason is not None,
                                finish_reason=reason)
            if lp is not None:
                output.logprob, output.top_logprobs = lp.logprob, lp.top
            if self.is_first:  # whole model here: the token feeds the next decode step
                seq.token_ids.append(token_id)
            if reason is not None:
                self._finish(seq, reason)
            yield output

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.sampling_params
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        # the new token counts: generated so far + 1
        if seq.num_generated_tokens + 1 >= params.max_tokens:
            return "length"
        if len(seq) + 1 >= self.max_model_len:
            return "length"
        return None

    def _drain_out_of_blocks(self) -> list[StepOutput]:
        outputs = []
        for seq in self.batcher.out_of_blocks:
            message = "this stage ran out of KV cache blocks"
            outputs.append(StepOutput(seq.request_id, finished=True, finish_reason="error",
                                      error=message))
            self._finish(seq, "error")
        self.batcher.out_of_blocks.clear()
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.batcher.remove(seq)
        self.sequences.pop(seq.request_id, None)

    # ---- observability -------------------------------------------------------------------

    def take_preempted(self) -> list[str]:
        """Request ids preempted since the last call (their KV on later stages is stale)."""
        preempted, self.batcher.preempted_ids = self.batcher.preempted_ids, []
        return preempted

    @property
    def num_local_layers(self) -> int:
        return self.model.end_layer - self.model.start_layer

    @property
    def num_running(self) -> int:
        return len(self.batcher.running)

    @property
    def num_waiting(self) -> int:
        return len(self.batcher.waiting)

    @property
    def num_prefix_hit_tokens(self) -> int:
        """Prompt tokens this stage skipped because its prefix cache held their KV."""
        return self.block_manager.num_prefix_hit_tokens

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_manager.num_blocks
