"""A node's start from a GGUF on the hub: only its own layers' bytes vs the whole file first.

    .venv/bin/python benchmarks/hub_gguf_bench.py [--layers 16] [--hidden 1024] [--ffn 2816]
        [--mb-per-s 50] [--dir /tmp/hub-gguf-bench]

A synthetic Llama GGUF (Q8_0, untied output, SmolLM2's tokenizer metadata in its header, about
300 MB with the defaults) is served by the local stand-in for the hub (tests/hub_server.py)
through a link of `--mb-per-s` shared by all answers (0: unthrottled loopback). For each shard,
from an empty cache: bytes received (counted by the server) and seconds until the shard is
loaded and ready to compute, for `load_shard("test/Bench-GGUF:Q8_0", start, end)` (header,
then the shard's tensor ranges) against downloading the whole file, then loading the shard
from it. Prints the CPU flags and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallax.models.hub import builtin_gguf_path  # noqa: E402
from parallax.models.loader import load_shard  # noqa: E402
from tests.hub_server import FakeHub, write_llama_gguf  # noqa: E402

MODEL = "test/Bench-GGUF:Q8_0"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(sorted(flags & {"avx2", "avx512f", "avx512bw", "fma",
                                                    "avx512_vnni", "avx_vnni", "f16c"}))
    except OSError:
        pass
    return "?"


def fresh_client(hub: FakeHub, root: str, name: str) -> str:
    cache = os.path.join(root, f"cache-{name}")
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["HF_ENDPOINT"] = hub.endpoint(name)
    os.environ["HF_HUB_CACHE"] = cache
    return cache


def partial(hub: FakeHub, root: str, name: str, start: int, end: int) -> tuple[int, float]:
    fresh_client(hub, root, name)
    began = time.perf_counter()
    load_shard(MODEL, start, end)
    return hub.sent[name], time.perf_counter() - began


def whole_first(hub: FakeHub, root: str, name: str, start: int, end: int) -> tuple[int, float]:
    cache = fresh_client(hub, root, name)
    os.makedirs(cache)
    target = os.path.join(cache, "Bench-Q8_0.gguf")
    began = time.perf_counter()
    url = f"{hub.endpoint(name)}/test/Bench-GGUF/resolve/main/Bench-Q8_0.gguf"
    with httpx.stream("GET", url, follow_redirects=True, timeout=60) as response, \
            open(target, "wb") as f:
        response.raise_for_status()
        for chunk in response.iter_raw(2**20):
            f.write(chunk)
    load_shard(target, start, end)
    return hub.sent[name], time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--mb-per-s", type=float, default=50.0)
    parser.add_argument("--dir", default="/tmp/hub-gguf-bench")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "Bench-Q8_0.gguf")
    if not os.path.exists(path):
        write_llama_gguf(path, args.layers, hidden=args.hidden, ffn=args.ffn, num_heads=16,
                         num_kv_heads=4, tokenizer_from=builtin_gguf_path())
    size = os.path.getsize(path)
    third = args.layers // 3
    shards = {"first half": (0, args.layers // 2),
              "middle third": (third, args.layers - third)}
    print(f"CPU flags: {cpu_flags()}; file {size / 1e6:.0f} MB, {args.layers} layers, link "
          f"{args.mb_per_s or 'unthrottled'} MB/s")
    with FakeHub({"test/Bench-GGUF": {"Bench-Q8_0.gguf": path}}) as hub:
        load_shard(path, 0, 1)  # imports and kernels, outside the timings
        hub.bytes_per_s = args.mb_per_s * 1e6 if args.mb_per_s else None
        print("| shard | layers | whole file first: MB, s | own layers only: MB, s "
              "| bytes | time |")
        print("|---|---|---|---|---|---|")
        for label, (start, end) in shards.items():
            key = label.replace(" ", "-")
            whole_bytes, whole_s = whole_first(hub, args.dir, f"whole-{key}", start, end)
            part_bytes, part_s = partial(hub, args.dir, f"part-{key}", start, end)
            print(f"| {label} | [{start}, {end}) | {whole_bytes / 1e6:.0f} MB, {whole_s:.1f} s "
                  f"| {part_bytes / 1e6:.0f} MB, {part_s:.1f} s "
                  f"| {100 * part_bytes / whole_bytes:.0f} % | {100 * part_s / whole_s:.0f} % |")


if __name__ == "__main__":
    main()
