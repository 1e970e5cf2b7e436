"""Engine throughput vs transformers and llama.cpp, same GGUF weights, threads and prompts.

    .venv/bin/python benchmarks/engine_bench.py [--model smollm2|synthetic-q4_k_m|synthetic-q8_0|PATH]
        [--dtype float32|bfloat16] [--new-tokens 128] [--llama-python PYTHON] [--skip NAME ...]
        [--activation-int8 auto|on|off|both]

Prints a markdown table: batch-1 decode tok/s, aggregate tok/s at 8 and 32 concurrent requests,
prefill tok/s for a 512-token prompt, peak RSS after batch-1 decode and prefill with a 2048-token
fp32 KV cache on both sides (llama.cpp: n_ctx 2048, f32 K/V), peak RSS over the whole run, and
our ratio to each baseline. Each system runs in its own child process, one after the other, so
its peak RSS is its own. `synthetic-*` is the 1.2 B Llama of benchmarks/synthetic_gguf.py (built
once, cached). llama.cpp runs where llama-cpp-python imports: in this interpreter or in
`--llama-python` (a separate venv: `python -m venv V && V/bin/pip install llama-cpp-python`;
never part of `make test`). llama-cpp-python serves one sequence at a time, so it has batch-1
rows only. `--activation-int8` is the node's setting for our decode matmuls (auto: int8
activations from 1 B parameters); `both` adds a row "parallax-fp32act" with them off, so the
table shows the int8 path against the fp32-activation one in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

# torch and parallax are imported inside the systems that use them: the llama.cpp child may run
# in another interpreter that has neither.
KV_CONTEXT = 2048  # tokens of KV cache both sides hold for the batch-1 and prefill rows
MODELS = ("smollm2", "synthetic-q4_k_m", "synthetic-q8_0")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(count)]


def model_path(model: str) -> str:
    """The GGUF file a --model choice names (building the synthetic one on first use)."""
    if model == "smollm2":
        from parallax.models.hub import builtin_gguf_path

        return builtin_gguf_path()
    if model.startswith("synthetic-"):
        sys.path.insert(0, str(Path(__file__).parent))
        from synthetic_gguf import synthetic_gguf

        return str(synthetic_gguf(model.removeprefix("synthetic-")))
    return model


ACTIVATION_INT8 = "auto"  # child mode: --activation-int8 of the parallax rows


class ParallaxSystem:
    name = "parallax"

    def __init__(self, path: str, dtype_name: str) -> None:
        import torch

        from parallax.models.loader import load_shard
        from parallax.models.quant.loading import activation_int8_wanted, set_activation_int8
        from parallax.models.sizing import formula_param_counts, kv_bytes_per_token_per_layer

        self.dtype = getattr(torch, dtype_name)
        shard = load_shard(path, dtype=self.dtype)
        self.model = shard.model
        layer, embedding, head = formula_param_counts(shard.config)
        num_params = layer * shard.config.num_hidden_layers + embedding + head
        mode = "off" if self.name == "parallax-fp32act" else ACTIVATION_INT8
        set_activation_int8(self.model, activation_int8_wanted(mode, num_params))
        self.kv_bytes_per_token = shard.config.num_hidden_layers * kv_bytes_per_token_per_layer(
            shard.config, torch.finfo(self.dtype).bits // 8)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """Returns (seconds to first token of the batch, total seconds)."""
        from parallax.engine.engine import Engine, EngineConfig
        from parallax.engine.sampling_params import SamplingParams

        # the batch-1 rows hold the same context as llama.cpp's n_ctx; a batch holds its own
        tokens = max(KV_CONTEXT, len(prompts) * (max(map(len, prompts)) + new_tokens + 16))
        engine = Engine(self.model, EngineConfig(
            kv_memory_bytes=tokens * self.kv_bytes_per_token, dtype=self.dtype,
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


class ParallaxFp32ActSystem(ParallaxSystem):
    name = "parallax-fp32act"  # decode matmuls with fp32 activations (--activation-int8 both)


class TransformersSystem:
    name = "transformers"

    def __init__(self, path: str, dtype_name: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path),
            dtype=getattr(torch, dtype_name)).eval()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        import torch

        with torch.inference_mode():
            return self._generate(torch, prompts, new_tokens)

    def _generate(self, torch, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
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

    def __init__(self, path: str, dtype_name: str) -> None:
        from llama_cpp import Llama

        # f32 K/V, as our CPU engine keeps its KV cache in the weights' float32
        kv_type = 0 if dtype_name == "float32" else 1  # GGML_TYPE_F32 / GGML_TYPE_F16
        self.model = Llama(path, n_ctx=KV_CONTEXT, n_threads=THREADS, n_threads_batch=THREADS,
                           type_k=kv_type, type_v=kv_type, verbose=False)

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


THREADS = os.cpu_count() or 1


def measure(system, new_tokens: int) -> dict[str, float]:
    row: dict[str, float] = {}
    system.generate(make_prompts(1, 16, 0), 4)  # warm-up
    first, total = system.generate(make_prompts(1, 20, 1), new_tokens)
    row["batch-1 decode tok/s"] = (new_tokens - 1) / max(total - first, 1e-9)
    first, _ = system.generate(make_prompts(1, 512, 2), 1)
    row["prefill 512 tok/s"] = 512 / first
    row[f"peak RSS MB ({KV_CONTEXT}-token KV)"] = peak_rss_mb()
    for concurrency in (8, 32):
        try:
            _, total = system.generate(make_prompts(concurrency, 20, concurrency), new_tokens)
            row[f"{concurrency} concurrent tok/s"] = concurrency * new_tokens / total
        except NotImplementedError:
            row[f"{concurrency} concurrent tok/s"] = float("nan")
    row["peak RSS MB (whole run)"] = peak_rss_mb()
    return row


SYSTEMS = {cls.name: cls for cls in (ParallaxSystem, ParallaxFp32ActSystem, TransformersSystem,
                                     LlamaCppSystem)}


def run_one(name: str, path: str, dtype_name: str, new_tokens: int,
            threads: int) -> dict[str, float]:
    """Measure one system in this process; prints its row as JSON on the last line."""
    global THREADS
    THREADS = threads
    if name != "llama.cpp":
        import torch

        torch.set_num_threads(threads)
    return measure(SYSTEMS[name](path, dtype_name), new_tokens)


def llama_python(requested: str | None) -> str | None:
    """The interpreter that can import llama_cpp, or None."""
    for candidate in ([requested] if requested else [sys.executable]):
        probe = subprocess.run([candidate, "-c", "import llama_cpp"], capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


def run_child(python: str, name: str, path: str, args) -> dict[str, float]:
    """One system in its own process (its peak RSS is its own); its row from the last line."""
    result = subprocess.run(
        [python, __file__, "--system", name, "--model", path, "--dtype", args.dtype,
         "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
         "--activation-int8", "on" if args.activation_int8 == "both" else args.activation_int8],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help=f"{', '.join(MODELS)} or a GGUF path (default smollm2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip", nargs="*", default=[], help="systems to skip")
    parser.add_argument("--llama-python", default=None,
                        help="a Python that imports llama_cpp (default: this one, if it does)")
    parser.add_argument("--activation-int8", default="auto", choices=["auto", "on", "off", "both"],
                        help="our decode activations, as the node's setting (both: two rows)")
    parser.add_argument("--system", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    global ACTIVATION_INT8
    ACTIVATION_INT8 = args.activation_int8
    if args.system:
        print(json.dumps(run_one(args.system, args.model, args.dtype, args.new_tokens,
                                 args.threads)))
        return
    path = model_path(args.model)
    pythons = {"parallax": sys.executable, "transformers": sys.executable}
    if args.activation_int8 == "both":
        pythons = {"parallax": sys.executable, "parallax-fp32act": sys.executable,
                   "transformers": sys.executable}
    if "llama.cpp" not in args.skip:
        found = llama_python(args.llama_python)
        if found:
            pythons["llama.cpp"] = found
        else:
            print("llama-cpp-python not importable: skipping llama.cpp (see --llama-python)")
    rows: dict[str, dict[str, float]] = {}
    for name, python in pythons.items():
        if name not in args.skip:
            rows[name] = run_child(python, name, path, args)
            print(name, rows[name], flush=True)
    print_table(rows, path, args)


def print_table(rows: dict[str, dict[str, float]], path: str, args) -> None:
    from parallax.models.gguf import dequantize_requested
    from parallax.models.quant import native

    metrics = list(next(iter(rows.values())))
    names = list(rows)
    lib = native.kernels()
    print(f"\n{os.path.basename(path)} ({os.path.getsize(path) / 2**20:.0f} MiB), {args.dtype}, "
          f"{args.threads} threads, {args.new_tokens} new tokens per request; CPU flags: "
          f"{native.flags_summary()}; GGUF "
          f"{'dequantized on load' if dequantize_requested() else 'kept packed'}, kernels "
          f"{lib.variant if lib else 'torch path'}, --activation-int8 {args.activation_int8}\n")
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
