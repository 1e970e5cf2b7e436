"""MoE throughput: our engine vs transformers' forward on the same random weights and dtype.

    .venv/bin/python benchmarks/moe_bench.py [--families qwen3_moe gpt_oss minimax_m2]
        [--batches 1 16] [--prompt-len 64] [--new-tokens 32] [--dtype float32] [--device cpu]
        [--threads 1] [--repeats 1] [--no-pack] [--mxfp4]

Each family gets a tiny-but-not-trivial config (hidden 1024, 16 experts, top-4, 4 layers),
saved with save_pretrained and loaded by both sides. For every batch size, each system greedily
generates `new-tokens` tokens after an equal-length prompt per request; tok/s counts generated
tokens over the time of the whole generation (prefill included), after a small warm-up; with
`--repeats N` each system runs N times, interleaved, and the table keeps each one's fastest run
(by wall and by CPU time separately). Our engine is built before the clock starts (a server
builds it once).

This benchmark runs our CPU expert matmuls on oneDNN-packed weights
(parallax.models.moe.PACK_CPU_EXPERTS; servers do so only with PARALLAX_PACK_CPU_EXPERTS=1,
because the packed copy doubles expert memory); `--no-pack` turns that off, for an A/B
against the plain F.linear per expert, which is what servers run by default.

`--mxfp4` gives gpt-oss random MXFP4 experts, as its published checkpoints have: our engine
loads them packed (MXFP4 kernels, parallax.models.quant), transformers gets their
dequantization in the benchmark's dtype (what it runs on a CPU).

Baselines: transformers' greedy loop of forward calls with its DynamicCache (no generate()
overhead), with its default experts implementation (5.24: `grouped_mm`, already grouped by
expert) and with `experts_implementation="eager"` (the per-expert loop in the modeling files).

On CPU the default is one torch thread and the table also shows tok/s over process CPU time:
on a shared machine, idle OpenMP workers waiting for a busy core turn microsecond ops into
tens of milliseconds, so wall time there measures the neighbours, not the code. Every cell is
"by wall (by CPU time)"; the ratio columns are our speedup over each baseline (>1: faster).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models import moe
from parallax.models.loader import load_shard
from parallax.models.mxfp4 import save_random_mxfp4_checkpoint

COMMON = dict(
    hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
    num_hidden_layers=4, vocab_size=8192, max_position_embeddings=4096, num_experts_per_tok=4,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
FAMILIES = {
    "qwen3_moe": dict(num_experts=16, moe_intermediate_size=512, intermediate_size=2048,
                      norm_topk_prob=True),
    "gpt_oss": dict(num_local_experts=16, intermediate_size=512, sliding_window=128),
    "minimax_m2": dict(num_local_experts=16, intermediate_size=512, rotary_dim=32),
}


def save_model(model_type: str, directory: str, dtype: torch.dtype, mxfp4: bool = False) -> str:
    """Save a random model for transformers into `directory`; returns the checkpoint our engine
    loads: the same one, or (mxfp4, gpt-oss) a copy whose experts are MXFP4 blocks of the same
    values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **COMMON, **FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ours = directory
    if mxfp4 and model_type == "gpt_oss":
        ours = os.path.join(directory, "mxfp4")
        save_random_mxfp4_checkpoint(model, ours)  # also sets the model's experts to it
    model.save_pretrained(directory, safe_serialization=True)
    return ours


def make_prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8192) for _ in range(length)] for _ in range(count)]


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def run_parallax(model, prompts, new_tokens: int, dtype, device: str) -> Clock:
    """Generate new_tokens for every prompt through one Engine (built before the clock)."""
    engine = Engine(model, EngineConfig(kv_memory_bytes=64 * 2**20, dtype=dtype, device=device,
                                        max_num_seqs=64, max_num_batched_tokens=4096,
                                        enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    with Clock(device) as clock:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        while engine.has_work():
            engine.step()
    return clock


@torch.inference_mode()
def run_transformers(model, prompts, new_tokens: int, device: str) -> Clock:
    """A greedy loop of forward calls with a DynamicCache (equal-length prompts, no padding)."""
    from transformers import DynamicCache

    ids = torch.tensor(prompts, device=device)
    with Clock(device) as clock:
        cache = DynamicCache(config=model.config)
        logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
        for _ in range(new_tokens - 1):
            next_ids = logits.argmax(-1, keepdim=True)  # [B, 1]
            logits = model(next_ids, cache=cache, use_cache=True).logits[:, -1]
        logits.argmax(-1).tolist()
    return clock


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs per system; keep the best")
    parser.add_argument("--no-pack", action="store_true",
                        help="plain F.linear experts (no oneDNN-packed weights) for an A/B")
    parser.add_argument("--mxfp4", action="store_true",
                        help="gpt-oss with MXFP4 experts (ours packed, transformers dequantized)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    moe.PACK_CPU_EXPERTS = not args.no_pack
    dtype = getattr(torch, args.dtype)
    from transformers import AutoModelForCausalLM

    print(f"device {args.device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per request, "
          f"packed experts {moe.PACK_CPU_EXPERTS}, MXFP4 gpt-oss experts {args.mxfp4}, "
          f"best of {args.repeats}; "
          "tok/s by wall time (by process CPU time)\n")
    print("| family | batch | parallax tok/s | transformers (grouped_mm) tok/s | "
          "transformers (eager experts) tok/s | parallax / grouped_mm | parallax / eager |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for family in args.families:
        with tempfile.TemporaryDirectory() as directory:
            ours_path = save_model(family, directory, dtype, args.mxfp4)
            ours = load_shard(ours_path, device=args.device, dtype=dtype).model
            baselines = [
                AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
                .to(args.device).eval()
                for kwargs in ({}, {"experts_implementation": "eager"})
            ]
            warm = make_prompts(2, 8, seed=99)
            run_parallax(ours, warm, 2, dtype, args.device)
            for model in baselines:
                run_transformers(model, warm, 2, args.device)
            for batch in args.batches:
                prompts = make_prompts(batch, args.prompt_len)
                tokens = batch * args.new_tokens
                runs = [[] for _ in range(3)]  # per system: its Clocks, repeats interleaved
                for _ in range(args.repeats):
                    runs[0].append(run_parallax(ours, prompts, args.new_tokens, dtype,
                                                args.device))
                    for system, model in zip(runs[1:], baselines, strict=True):
                        system.append(run_transformers(model, prompts, args.new_tokens,
                                                       args.device))
                # best (wall, cpu) seconds of each system
                best = [(min(c.wall for c in r), min(c.cpu for c in r)) for r in runs]
                cells = [f"{tokens / wall:.1f} ({tokens / cpu:.1f})" for wall, cpu in best]
                ratios = [f"{wall / best[0][0]:.2f}x ({cpu / best[0][1]:.2f}x)"
                          for wall, cpu in best[1:]]
                print(f"| {family} | {batch} | {' | '.join(cells)} | {' | '.join(ratios)} |",
                      flush=True)


if __name__ == "__main__":
    main()
