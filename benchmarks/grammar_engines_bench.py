"""Per-step cost of the grammar engines on CPU: llguidance (the one Parallax uses) vs
outlines-core (only when installed; it is not a dependency).

For one JSON schema (an object with an enum, a number and a list) on the built-in SmolLM2
tokenizer (49152 tokens): the time to build the tokenizer-level structures, to compile the
schema for one request, and the mean / max time to compute one step's token mask while
walking a valid answer token by token.

    python benchmarks/grammar_engines_bench.py
"""

from __future__ import annotations

import json
import statistics
import time

from parallax.models.hub import builtin_gguf_path
from parallax.models.loader import load_tokenizer
from parallax.models.quant.native import flags_summary

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "amount": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    },
    "required": ["color", "amount", "tags"],
    "additionalProperties": False,
}
ANSWER = json.dumps({"color": "green", "amount": 12.75,
                     "tags": ["fresh", "organic produce", "x"]})


def _ms(seconds: list[float]) -> str:
    return f"{1000 * statistics.mean(seconds):.3f} / {1000 * max(seconds):.3f}"


def bench_llguidance(tokenizer, ids: list[int]) -> tuple[str, float, float, list[float]]:
    import llguidance
    import llguidance.torch as llt

    started = time.perf_counter()
    lltok = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(),
                                   eos_token=tokenizer.eos_token_id)
    vocab_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ", ",
                          "key_separator": ": "})
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - started
    mask = llt.allocate_token_bitmask(1, lltok.vocab_size)
    steps = []
    for token in ids:
        started = time.perf_counter()
        llt.fill_next_token_bitmask(matcher, mask)
        steps.append(time.perf_counter() - started)
        assert matcher.consume_token(token), matcher.get_error()
    return f"llguidance {llguidance.__version__}", vocab_s, compile_s, steps


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _byte_tokens(tokenizer) -> dict[bytes, list[int]]:
    """GPT-2 byte-level token strings back to their bytes (outlines-core wants bytes)."""
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    out: dict[bytes, list[int]] = {}
    special = set(tokenizer.all_special_ids)
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        try:
            raw = bytes(decode[c] for c in token)
        except KeyError:
            continue
        out.setdefault(raw, []).append(index)
    return out


def bench_outlines(tokenizer, ids: list[int]) -> tuple[str, float, float, list[float]] | None:
    try:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        from outlines_core.kernels.torch import allocate_token_bitmask
    except ImportError:
        return None
    from importlib.metadata import version

    started = time.perf_counter()
    vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, _byte_tokens(tokenizer))
    vocab_s = time.perf_counter() - started
    started = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
    index = outlines_core.Index(regex, vocabulary)
    guide = outlines_core.Guide(index)
    compile_s = time.perf_counter() - started
    mask = allocate_token_bitmask(len(tokenizer))
    steps = []
    for token in ids:
        started = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        steps.append(time.perf_counter() - started)
        guide.advance(token)
    return f"outlines-core {version('outlines-core')}", vocab_s, compile_s, steps


def bench_engine_path(tokenizer, ids: list[int], batch: int = 16) -> tuple[list[float], list[float]]:
    """Parallax's own path at batch `batch`: GrammarMasker filling every row's mask (one
    thread hand-off, llguidance's pool) and apply_grammar_mask on [batch, vocab] logits."""
    from types import SimpleNamespace

    import torch

    from parallax.engine.grammar import GrammarMasker
    from parallax.engine.sampler import apply_grammar_mask
    from parallax.engine.sampling_params import SamplingParams
    from parallax.serving.structured import parse_response_format, tokenizer_json

    grammar = parse_response_format({"type": "json_schema", "json_schema": {
        "name": "bench", "schema": SCHEMA}}).grammar
    masker = GrammarMasker([tokenizer.eos_token_id])
    masker.set_vocab(tokenizer_json(tokenizer))
    seqs = [SimpleNamespace(sampling_params=SamplingParams(grammar=grammar), grammar=None,
                            generated_token_ids=[]) for _ in range(batch)]
    logits = torch.randn(batch, len(tokenizer))
    masker.wait(masker.start(seqs))  # builds the vocabulary and the matchers
    fills, applies = [], []
    for token in ids[:-1]:  # each step: the token sampled last is fed, then the next mask
        for seq in seqs:
            seq.generated_token_ids = [*seq.generated_token_ids, token]
        started = time.perf_counter()
        mask = masker.wait(masker.start(seqs))
        fills.append(time.perf_counter() - started)
        started = time.perf_counter()
        apply_grammar_mask(logits, mask)
        applies.append(time.perf_counter() - started)
    masker.close()
    return fills, applies


def main() -> None:
    tokenizer = load_tokenizer(str(builtin_gguf_path()))
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    print(f"CPU: {flags_summary()}; SmolLM2 tokenizer, {len(tokenizer)} tokens; "
          f"answer of {len(ids)} tokens")
    print("| engine | tokenizer setup (s) | schema compile (ms) | mask per step mean / max (ms) |")
    print("|---|---|---|---|")
    for run in (bench_llguidance, bench_outlines):
        result = run(tokenizer, ids)
        if result is None:
            print(f"| {run.__name__[6:]} | not installed | | |")
            continue
        name, vocab_s, compile_s, steps = result
        print(f"| {name} | {vocab_s:.2f} | {1000 * compile_s:.1f} | {_ms(steps)} |")
    fills, applies = bench_engine_path(tokenizer, ids)
    print(f"\nParallax at batch 16, per step mean / max (ms): masks of 16 rows {_ms(fills)}; "
          f"applying them to [16, {len(tokenizer)}] logits {_ms(applies)}")


if __name__ == "__main__":
    main()
