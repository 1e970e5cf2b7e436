"""Per-request sampling settings, validated once at the edge."""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

# Temperatures below this are greedy: dividing logits by them overflows fp32 (1e-45 turns every
# logit into ±inf, and softmax into NaN), and the distribution is a point mass anyway (vLLM's
# _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on `top_logprobs`


MIN_PRIORITY, MAX_PRIORITY = -20, 20  # as vLLM's API, lower first
# a grammar rides every stage message header of its request's first chunk (1 MiB of slack)
MAX_GRAMMAR_CHARS = 256 * 1024


@dataclass(frozen=True)
class Range:
    """The values a setting may take: [low, high], open at `low` when `low_open`. `str()` says
    it as an error message does (">= 0", "in (0, 1]")."""

    low: float
    high: float = math.inf
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# the one home of the sampling fields' ranges: the API's request parser
# (serving/openai_schemas.py) and `SamplingParams.validate` both check these
SAMPLING_RANGES: dict[str, Range] = {
    "temperature": Range(0),
    "top_p": Range(0, 1, low_open=True),
    "min_p": Range(0, 1),
    "max_tokens": Range(0, low_open=True),
    "presence_penalty": Range(-2, 2),
    "frequency_penalty": Range(-2, 2),
    "top_logprobs": Range(0, MAX_TOP_LOGPROBS),
    "priority": Range(MIN_PRIORITY, MAX_PRIORITY),
}


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
        for name, allowed in SAMPLING_RANGES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        if self.grammar is not None and not 0 < len(self.grammar) <= MAX_GRAMMAR_CHARS:
            raise ValueError(f"the grammar must have 1 to {MAX_GRAMMAR_CHARS} characters, got "
                             f"{len(self.grammar)}; use a smaller JSON schema")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
