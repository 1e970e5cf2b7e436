"""Per-request sampling settings, validated once at the edge."""

from __future__ import annotations

import math

import msgspec

# Temperatures below this are greedy: dividing logits by them overflows fp32 (1e-45 turns every
# logit into ±inf, and softmax into NaN), and the distribution is a point mass anyway (vLLM's
# _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on `top_logprobs`


MIN_PRIORITY, MAX_PRIORITY = -20, 20  # as vLLM's API, lower first
# a grammar rides every stage message header of its request's first chunk (1 MiB of slack)
MAX_GRAMMAR_CHARS = 256 * 1024


def check_prompt_length(num_prompt: int, max_model_len: int) -> None:
    """ValueError unless the prompt leaves room for at least one generated token."""
    if num_prompt >= max_model_len:
        raise ValueError(f"the prompt has {num_prompt} tokens; the model's context is "
                         f"{max_model_len} tokens including the answer")


class SamplingParams(msgspec.Struct, frozen=True):
    """How to pick tokens for one request. Travels on the wire with a request's first chunk.

    `temperature < GREEDY_TEMPERATURE` (0 included) means greedy. `top_k <= 0` and
    `top_p == 1` and `min_p == 0` disable those filters. `seed` makes sampling reproducible per
    request (same seed, same output). `logprobs`: the last stage reports each sampled token's
    log-probability and the `top_logprobs` most likely alternatives (parallax/engine/sampler.py).
    `grammar`: an llguidance grammar (JSON schema or Lark, from parallax/serving/structured.py)
    that the last stage constrains decoding to (parallax/engine/grammar.py).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    priority: int = 0  # lower is admitted first; equal ones first come, first served
    grammar: str | None = None

    def validate(self) -> None:
        """Raise ValueError with a message a user can act on (NaN and inf included)."""
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                             f"{self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        if self.grammar is not None and not 0 < len(self.grammar) <= MAX_GRAMMAR_CHARS:
            raise ValueError(f"the grammar must have 1 to {MAX_GRAMMAR_CHARS} characters, got "
                             f"{len(self.grammar)}; use a smaller JSON schema")
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got "
                             f"{self.priority}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
