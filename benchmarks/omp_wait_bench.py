"""Decode speed with OpenMP threads that spin or sleep while they wait, on a quiet and a busy CPU.

    .venv/bin/python benchmarks/omp_wait_bench.py [--model smollm2|synthetic-q4_k_m|PATH]
        [--new-tokens 48] [--busy 0 2]

Each cell runs in its own child process (libgomp reads its wait policy once, when torch loads
it): "spin" is libgomp's own default (GOMP_SPINCOUNT=300000), "short spin" GOMP_SPINCOUNT=10000,
"passive" OMP_WAIT_POLICY=PASSIVE (threads sleep at once). `--busy N` runs N processes that each keep a
core busy during the measurement, the way a browser or a game shares a home machine. Prints
batch-1 and 8-concurrent decode tok/s per cell and each policy's ratio to spin, beside the CPU
flags.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

POLICIES = {"spin": {"GOMP_SPINCOUNT": "300000"}, "short spin": {"GOMP_SPINCOUNT": "10000"},
            "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def decode_rates(path: str, new_tokens: int) -> dict[str, float]:
    """Batch-1 and 8-concurrent decode tok/s of our engine on `path` (child process)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_bench import ParallaxSystem, make_prompts

    system = ParallaxSystem(path, "float32")
    system.generate(make_prompts(1, 16, 0), 4)  # warm-up
    rates = {}
    for batch in (1, 8):
        first, total = system.generate(make_prompts(batch, 20, batch), new_tokens)
        rates[f"batch {batch}"] = batch * (new_tokens - 1) / max(total - first, 1e-9)
    return rates


def busy_loop(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def run_cell(policy: str, busy: int, args) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    workers = [multiprocessing.Process(target=busy_loop, args=(time.monotonic() + 600,),
                                       daemon=True) for _ in range(busy)]
    for worker in workers:
        worker.start()
    try:
        result = subprocess.run([sys.executable, __file__, "--child", "--model", args.model,
                                 "--new-tokens", str(args.new_tokens)], env=env,
                                capture_output=True, text=True, timeout=900)
    finally:
        for worker in workers:
            worker.terminate()
    if result.returncode != 0:
        raise SystemExit(f"{policy}/busy {busy} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_bench import model_path

    if args.child:
        print(json.dumps(decode_rates(model_path(args.model), args.new_tokens)))
        return
    from parallax.models.quant.native import flags_summary

    print(f"model {args.model}; {os.cpu_count()} CPUs; {flags_summary()}\n")
    others = [policy for policy in POLICIES if policy != "spin"]
    print("| busy processes | decode | " + " | ".join(f"{p} tok/s" for p in POLICIES) + " | "
          + " | ".join(f"{p} / spin" for p in others) + " |")
    print("|---" * (2 + len(POLICIES) + len(others)) + "|")
    for busy in args.busy:
        cells = {policy: run_cell(policy, busy, args) for policy in POLICIES}
        for key in cells["spin"]:
            rates = [cells[policy][key] for policy in POLICIES]
            ratios = [cells[policy][key] / cells["spin"][key] for policy in others]
            print(f"| {busy} | {key} | " + " | ".join(f"{r:.1f}" for r in rates) + " | "
                  + " | ".join(f"{r:.2f}x" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
