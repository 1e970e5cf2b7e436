"""Next-token choice for a batch of rows, each with its own sampling params.

All-greedy batches (the common benchmark case) are one argmax. Penalties follow OpenAI's
definition: presence and frequency of tokens in the generated text so far.

A row that cannot be sampled (NaN or +inf logits from the model, a distribution that filtering
left empty or non-finite, an error inside torch) becomes a `RowFailure`: only its request fails,
the other rows of the batch get their tokens. Nothing non-finite ever reaches
`torch.multinomial`, which on CUDA would be a device-side assert that poisons the process.

Grammar-constrained rows (parallax/engine/grammar.py) have their disallowed tokens set to -inf
by `apply_grammar_mask` before anything else, so greedy, sampling and logprobs all see the
constrained distribution; the other rows of the batch are not touched.

Logprobs (`token_logprobs`, only for the rows whose request asked): log-softmax of the logits
after penalties and temperature, before top-k / top-p / min-p truncation; greedy rows use the
logits after penalties as they are (temperature 1). One batched log-softmax and top-k for all
the rows that asked, one device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from parallax.engine.grammar import GrammarMask
from parallax.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RowFailure:
    """A row that got no token; `message` tells the user why (their request fails alone)."""

    message: str


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the `top_logprobs` most likely (id, logprob),
    most likely first."""

    logprob: float
    top: list[tuple[int, float]]


# the floor of reported logprobs: -inf (a token the model rules out) is not JSON, and OpenAI
# reports -9999.0 for tokens that unlikely
LOGPROB_FLOOR = -9999.0

NON_FINITE_LOGITS = RowFailure(
    "the model produced NaN or infinite logits for this request (numerical overflow); "
    "retry, or run the model in float32 or bfloat16")


def allowed_tokens(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 bitmasks [R, W] (bit t % 32 of word t // 32) → bool [R, vocab]; tokens past the
    mask's words are not allowed. numpy's unpackbits: an order of magnitude faster on CPU than
    shifting in torch."""
    raw = np.ascontiguousarray(bits.cpu().numpy()).view(np.uint8)  # little-endian words
    allowed = torch.from_numpy(np.unpackbits(raw, axis=1, bitorder="little").view(np.bool_))
    if allowed.shape[1] < vocab:
        return torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    return allowed[:, :vocab]


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask | None) -> torch.Tensor:
    """logits: [N, V]. The rows in `mask.rows` keep only their allowed tokens (the others
    -inf); a new tensor when a row is masked, `logits` itself otherwise. Tokens beyond the
    grammar's vocabulary (padding rows of the lm_head) are never allowed."""
    if mask is None or not mask.rows:
        return logits
    allowed = allowed_tokens(mask.bits, logits.shape[-1]).to(logits.device)
    if mask.rows == list(range(logits.shape[0])):  # every row constrained: no copy first
        return torch.where(allowed, logits, float("-inf"))
    rows = torch.tensor(mask.rows, device=logits.device)
    masked = logits.clone()
    masked[rows] = torch.where(allowed, logits[rows], float("-inf"))
    return masked


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, generated: list[int]
) -> torch.Tensor:
    """logits: [V] fp32. Returns penalised logits (new tensor when a penalty applies)."""
    if not generated or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    counts = torch.bincount(
        torch.tensor(generated, device=logits.device), minlength=logits.shape[-1]
    ).to(logits.dtype)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks. logits: [V] fp32."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop tokens once the mass before them already reaches top_p (keeps at least one)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def _sample_row(row: torch.Tensor, params: SamplingParams, generated: list[int],
                generator: torch.Generator | None) -> int | RowFailure:
    row = apply_penalties(row, params, generated)
    if params.is_greedy:
        return int(row.argmax())
    probs = filter_logits(row, params).softmax(-1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return RowFailure("sampling found no valid token distribution for this request "
                          f"(temperature {params.temperature}, top_p {params.top_p}, "
                          f"min_p {params.min_p}); use temperature 0 for greedy decoding")
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generated: list[list[int]],
    generators: list[torch.Generator | None],
) -> list[int | RowFailure]:
    """logits: [N, V] fp32, one row per sequence due a token. Returns N token ids or failures."""
    best, argmax = logits.max(dim=-1)  # max propagates NaN: one reduction finds the bad rows
    finite = torch.isfinite(best)
    if all(p.is_greedy and p.presence_penalty == 0 and p.frequency_penalty == 0 for p in params):
        ids = torch.where(finite, argmax, -1).tolist()  # one device sync for the whole batch
        return [NON_FINITE_LOGITS if i < 0 else i for i in ids]
    tokens: list[int | RowFailure] = []
    for row, ok, p, gen_ids, generator in zip(logits, finite.tolist(), params, generated,
                                              generators, strict=True):
        if not ok:
            tokens.append(NON_FINITE_LOGITS)
            continue
        try:
            tokens.append(_sample_row(row, p, gen_ids, generator))
        except (RuntimeError, ValueError) as exc:  # torch refused this row: fail it alone
            tokens.append(RowFailure(f"sampling failed for this request: {exc}"))
    return tokens


def token_logprobs(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generated: list[list[int]],
    tokens: list[int | RowFailure],
) -> list[TokenLogprobs | None]:
    """Logprobs of the tokens `sample` chose (same arguments, `generated` not yet extended),
    for the rows whose params ask for them; None for the others and for failed rows."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [i for i, (p, t) in enumerate(zip(params, tokens, strict=True))
              if p.logprobs and not isinstance(t, RowFailure)]
    if not wanted:
        return out
    rows = []
    for i in wanted:
        row = apply_penalties(logits[i], params[i], generated[i])
        rows.append(row if params[i].is_greedy else row / params[i].temperature)
    logprobs = torch.stack(rows).float().log_softmax(-1)
    chosen_ids = torch.tensor([tokens[i] for i in wanted], device=logprobs.device)
    chosen = logprobs.gather(1, chosen_ids[:, None]).squeeze(1).clamp(min=LOGPROB_FLOOR)
    k = min(max(params[i].top_logprobs for i in wanted), logprobs.shape[-1])
    if k:
        top_values, top_ids = torch.topk(logprobs, k, dim=-1)  # sorted, most likely first
        top_values = top_values.clamp(min=LOGPROB_FLOOR).tolist()
        top_ids = top_ids.tolist()
    for n, (i, value) in enumerate(zip(wanted, chosen.tolist(), strict=True)):
        want = min(params[i].top_logprobs, k)
        top = list(zip(top_ids[n][:want], top_values[n][:want], strict=True)) if want else []
        out[i] = TokenLogprobs(float(value), top)
    return out
