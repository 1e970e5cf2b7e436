"""Engine throughput vs transformers (and llama-cpp-python when installed), same weights/dtype.

    .venv/bin/python benchmarks/engine_bench.py [--dtype float32|bfloat16] [--new-tokens 128]

Prints a markdown table: batch-1 decode tok/s, aggregate tok/s at 8 and 32 concurrent requests,
prefill tok/s for a 512-token prompt, peak RSS, and our ratio to each baseline. Each system runs
in its own child process, one after the other, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time

import torch

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models.hub import builtin_gguf_path
from parallax.models.loader import load_shard


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(count)]


class ParallaxSystem:
    name = "parallax"

    def __init__(self, path: str, dtype: torch.dtype) -> None:
        self.model = load_shard(path, dtype=dtype).model
        self.dtype = dtype

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """Returns (seconds to first token of the batch, total seconds)."""
        engine = Engine(self.model, EngineConfig(kv_memory_bytes=512 * 2**20, dtype=self.dtype,
                                                 max_num_seqs=64, enable_prefix_caching=False))
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        first = None
        while engine.has_work():
            if engine.step() and first is None:
                first = time.perf_counter() - start
        return first, time.perf_counter() - start


class TransformersSystem:
    name = "transformers"

    def __init__(self, path: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
        ).eval()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        width = max(len(p) for p in prompts)
        # left padding so every row ends at the same position
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        start = time.perf_counter()
        self.model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                            pad_token_id=0)
        first = time.perf_counter() - start
        start = time.perf_counter()
        self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return first, time.perf_counter() - start


class LlamaCppSystem:
    name = "llama.cpp"

    def __init__(self, path: str, dtype: torch.dtype) -> None:
        from llama_cpp import Llama

        self.model = Llama(path, n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        if len(prompts) > 1:
            raise NotImplementedError  # llama-cpp-python serves one sequence at a time
        self.model.reset()
        start = time.perf_counter()
        first = None
        for count, _ in enumerate(self.model.generate(prompts[0], temp=0.0)):
            if first is None:
                first = time.perf_counter() - start
            if count + 1 >= new_tokens:
                break
        return first, time.perf_counter() - start


def measure(system, new_tokens: int) -> dict[str, float]:
    row: dict[str, float] = {}
    system.generate(make_prompts(1, 16, 0), 4)  # warm-up
    first, total = system.generate(make_prompts(1, 20, 1), new_tokens)
    row["batch-1 decode tok/s"] = (new_tokens - 1) / max(total - first, 1e-9)
    for concurrency in (8, 32):
        try:
            _, total = system.generate(make_prompts(concurrency, 20, concurrency), new_tokens)
            row[f"{concurrency} concurrent tok/s"] = concurrency * new_tokens / total
        except NotImplementedError:
            row[f"{concurrency} concurrent tok/s"] = float("nan")
    first, _ = system.generate(make_prompts(1, 512, 2), 1)
    row["prefill 512 tok/s"] = 512 / first
    return row


SYSTEMS = {cls.name: cls for cls in (ParallaxSystem, TransformersSystem, LlamaCppSystem)}


def run_one(name: str, dtype_name: str, new_tokens: int, threads: int) -> dict[str, float]:
    """Measure one system in this process; prints its row as JSON on the last line."""
    torch.set_num_threads(threads)
    system = SYSTEMS[name](builtin_gguf_path(), getattr(torch, dtype_name))
    row = measure(system, new_tokens)
    row["peak RSS MB"] = peak_rss_mb()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip", nargs="*", default=[], help="systems to skip")
    parser.add_argument("--system", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.system:
        print(json.dumps(run_one(args.system, args.dtype, args.new_tokens, args.threads)))
        return
    names = ["parallax", "transformers"]
    if importlib.util.find_spec("llama_cpp") is not None:
        names.append("llama.cpp")
    else:
        print("llama-cpp-python not installed: skipping llama.cpp")
    rows: dict[str, dict[str, float]] = {}
    for name in [n for n in names if n not in args.skip]:
        result = subprocess.run(
            [sys.executable, __file__, "--system", name, "--dtype", args.dtype,
             "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)],
            capture_output=True, text=True, check=True)
        rows[name] = json.loads(result.stdout.strip().splitlines()[-1])
        print(name, rows[name], flush=True)
    metrics = list(next(iter(rows.values())))
    names = list(rows)
    from parallax.models.gguf import dequantize_requested
    from parallax.models.quant import native

    lib = native.kernels()
    print(f"\nSmolLM2-135M-Instruct, {args.dtype}, {args.threads} threads, "
          f"{args.new_tokens} new tokens per request; CPU flags: {native.flags_summary()}; "
          f"GGUF {'dequantized on load' if dequantize_requested() else 'kept packed'}, kernels "
          f"{lib.variant if lib else 'torch path'}\n")
    header = "| metric | " + " | ".join(names) + " | " + " | ".join(
        f"parallax / {n}" for n in names[1:]) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(names) - 1))
    for metric in metrics:
        values = [rows[n][metric] for n in names]
        ratios = [values[0] / v if v and v == v else float("nan") for v in values[1:]]
        print(f"| {metric} | " + " | ".join(f"{v:.1f}" for v in values) + " | "
              + " | ".join(f"{r:.2f}x" for r in ratios) + " |")


if __name__ == "__main__":
    main()
