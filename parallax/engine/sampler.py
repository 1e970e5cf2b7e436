"""Next-token choice for a batch of rows, each with its own sampling params.

All-greedy batches (the common benchmark case) are one argmax. Penalties follow OpenAI's
definition: presence and frequency of tokens in the generated text so far.
"""

from __future__ import annotations

import torch

from parallax.engine.sampling_params import SamplingParams


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


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generated: list[list[int]],
    generators: list[torch.Generator | None],
) -> list[int]:
    """logits: [N, V] fp32, one row per sequence due a token. Returns N token ids."""
    if all(p.is_greedy and p.presence_penalty == 0 and p.frequency_penalty == 0 for p in params):
        return logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for row, p, gen_ids, generator in zip(logits, params, generated, generators, strict=True):
        row = apply_penalties(row, p, gen_ids)
        if p.is_greedy:
            tokens.append(int(row.argmax()))
            continue
        probs = filter_logits(row, p).softmax(-1)
        if generator is not None and generator.device != probs.device:
            probs = probs.cpu()
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens
