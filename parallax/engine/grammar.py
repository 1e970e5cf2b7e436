"""Grammar-constrained decoding on the stage that samples (llguidance).

A request whose `SamplingParams.grammar` is set (an llguidance grammar: a JSON schema or a Lark
grammar, built and validated by the frontend, parallax/serving/structured.py) gets a token-level
matcher on the last stage. Each step, before sampling, the matcher is fed the tokens the request
generated since it last saw it (so a replayed or preempted request, prefilled with its generated
ids, resumes in the right grammar state) and fills its row of a bitmask of allowed tokens; EOS is
allowed only where the grammar accepts. After sampling, the token is fed; a matcher that stopped
(nothing but EOS may follow) ends the request.

`GrammarMasker.start` computes the masks of a batch's constrained rows on a worker thread while
the model forward runs (llguidance releases the GIL), `GrammarMasker.wait` collects them; free
rows cost nothing.

The token-level vocabulary comes from the frontend of the same node (`SetGrammarVocab`: the
tokenizer's `tokenizer.json` text, which the frontend has loaded anyway, GGUF included); it is
built into an `LLTokenizer` on a thread when the first constrained request arrives.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

MASK_THREADS = 2  # llguidance threads filling the masks of one batch


class GrammarUnavailable(RuntimeError):
    """This stage cannot constrain decoding (no vocabulary from its frontend, or a tokenizer
    llguidance cannot read)."""


class GrammarVocab:
    """The llguidance tokenizer of this stage's model, built once on a thread when needed."""

    def __init__(self, tokenizer_json: str, eos_token_ids: list[int]) -> None:
        self._json = tokenizer_json
        self._eos = list(eos_token_ids)
        self._lock = threading.Lock()
        self._future: concurrent.futures.Future | None = None

    def warm(self) -> None:
        """Start building (idempotent): a constrained request arrived."""
        with self._lock:
            if self._future is None:
                self._future = concurrent.futures.Future()
                threading.Thread(target=self._build, name="parallax-grammar-vocab",
                                 daemon=True).start()

    def _build(self) -> None:
        assert self._future is not None
        try:
            import llguidance

            tokenizer = llguidance.LLTokenizer(self._json, eos_token=self._eos or None)
            self._future.set_result(tokenizer)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            logger.error("cannot build the grammar vocabulary: %s", exc)
            self._future.set_exception(GrammarUnavailable(
                f"this model's tokenizer cannot be used for constrained decoding: {exc}"))

    def get(self):
        """The `llguidance.LLTokenizer` (waits for the build; raises GrammarUnavailable)."""
        self.warm()
        assert self._future is not None
        return self._future.result()


class RequestGrammar:
    """One request's matcher and how many of its generated tokens it has consumed."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.num_consumed = 0

    @property
    def error(self) -> str | None:
        if not self.matcher.is_error():
            return None
        return self.matcher.get_error() or "the grammar refused a token"

    def sync(self, generated: list[int]) -> None:
        """Feed the generated tokens it has not seen (replays, and stages that learn their
        tokens from the head); a token the grammar refuses puts the matcher in error."""
        if self.num_consumed < len(generated):
            self.matcher.consume_tokens(generated[self.num_consumed:])
            self.num_consumed = len(generated)

    def accept(self, token_id: int) -> bool:
        """Feed the token just sampled; returns whether the grammar is now complete (the
        request stops: nothing but EOS could follow)."""
        self.matcher.consume_token(token_id)
        self.num_consumed += 1
        return self.matcher.is_stopped()


@dataclass
class GrammarMask:
    """Allowed tokens of some rows of a batch: `bits[i]` is a bitmask (bit t of word t // 32)
    for the sampled row `rows[i]`; `errors` are rows whose grammar cannot go on."""

    rows: list[int]
    bits: torch.Tensor  # int32 [len(rows), ceil(vocab / 32)]
    errors: dict[int, str]


class GrammarMasker:
    """Per engine: matchers of its constrained sequences, batch masks on a worker thread."""

    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.vocab: GrammarVocab | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="parallax-mask")
        self._executor = None  # llguidance.LLExecutor, made with the first mask

    def set_vocab(self, tokenizer_json: str) -> None:
        """The frontend's tokenizer (its `tokenizer.json` text)."""
        self.vocab = GrammarVocab(tokenizer_json, self.eos_token_ids)

    def admit(self, seq) -> None:
        """A constrained request arrived: start building the vocabulary if not done yet (it
        fails later, alone, when there is none)."""
        if self.vocab is not None:
            self.vocab.warm()

    def start(self, seqs: list) -> concurrent.futures.Future | None:
        """Compute the masks of `seqs` (the batch's sampled rows, in order) on the worker thread;
        None when no row is constrained."""
        rows = [i for i, seq in enumerate(seqs) if seq.sampling_params.grammar]
        if not rows:
            return None
        return self._pool.submit(self._masks, [seqs[i] for i in rows], rows)

    def wait(self, future: concurrent.futures.Future | None) -> GrammarMask | None:
        return None if future is None else future.result()

    def _masks(self, seqs: list, rows: list[int]) -> GrammarMask:
        try:
            return self._fill(seqs, rows)
        except Exception as exc:  # noqa: BLE001 - these rows fail, the batch goes on
            if not isinstance(exc, GrammarUnavailable):
                logger.exception("computing grammar masks failed")
            return GrammarMask([], torch.zeros(0, 1, dtype=torch.int32),
                               {row: f"constrained decoding failed: {exc}" for row in rows})

    def _fill(self, seqs: list, rows: list[int]) -> GrammarMask:
        import llguidance  # not llguidance.torch: it imports torch.compile (seconds)

        if self.vocab is None:
            raise GrammarUnavailable("this stage has no tokenizer for constrained decoding yet; "
                                     "retry in a moment")
        tokenizer = self.vocab.get()
        errors: dict[int, str] = {}
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=MASK_THREADS)
        live: list[tuple[object, int]] = []
        kept: list[int] = []
        for seq, row in zip(seqs, rows, strict=True):
            state = seq.grammar
            if state is None:  # first step of this request on this stage
                state = seq.grammar = RequestGrammar(
                    llguidance.LLMatcher(tokenizer, seq.sampling_params.grammar))
            state.sync(seq.generated_token_ids)
            if state.error is not None:
                errors[row] = f"the answer cannot follow the requested format: {state.error}"
                continue
            live.append((state.matcher, len(kept)))
            kept.append(row)
        words = (tokenizer.vocab_size + 31) // 32
        bits = torch.full((max(1, len(kept)), words), -1, dtype=torch.int32)
        if live:  # the matchers write their rows straight into `bits` (GIL released)
            self._executor.unsafe_compute_mask_ptr(live, bits.data_ptr(), words * 4, len(kept))
        return GrammarMask(kept, bits[:len(kept)], errors)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
