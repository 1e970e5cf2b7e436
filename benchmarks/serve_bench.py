"""`parallax serve` under N concurrent streaming clients vs the in-process engine, same run.

For each client count N (default 1, 8, 32) the same N prompts run twice:
- served: N concurrent streaming HTTP clients against a `parallax serve` subprocess;
- in-process: the same prompt ids added to an `Engine` in this process, stepped to the end.
Every request generates exactly `--max-tokens` tokens (ignore_eos), greedy. Reported: TTFT
p50/p99 (from the moment all N are sent), inter-token latency p50/p99, aggregate tok/s, and the
serving overhead 1 - served/in-process tok/s. Prints a markdown table.

    .venv/bin/python benchmarks/serve_bench.py [--clients 1,8,32] [--max-tokens 64]

`--json-schema`: the per-token cost of grammar-constrained decoding instead (in-process engine,
no server): at batch 1 and 16 (`--clients`, default 1,16 then), every request decodes
`--max-tokens` tokens greedily either free or under a `response_format` JSON schema (an array of
at least 500 objects with an enum, a number and a list of strings, so no answer completes
early); reported: ms per decode step (mean) and tok/s of both, and the cost of the grammar.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx

from parallax.config import parse_size
from parallax.serving.sse import aparse_sse_lines

TOPICS = ["the sea", "mountains", "a city at night", "rain", "the moon", "a forest", "winter",
          "a river", "the desert", "a library", "trains", "coffee", "the wind", "gardens"]


def prompts(n: int) -> list[str]:
    return [f"Write a short poem about {TOPICS[i % len(TOPICS)]} (number {i})." for i in range(n)]


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize(ttfts: list[float], itls: list[float], tokens: int, wall: float) -> dict:
    return {"ttft_p50": percentile(ttfts, 50) * 1e3, "ttft_p99": percentile(ttfts, 99) * 1e3,
            "itl_p50": percentile(itls, 50) * 1e3, "itl_p99": percentile(itls, 99) * 1e3,
            "tok_s": tokens / wall, "tokens": tokens}


# ---- served ---------------------------------------------------------------------------------


async def served_run(url: str, texts: list[str], max_tokens: int) -> dict:
    async def one(client: httpx.AsyncClient, text: str, t0: float):
        body = {"messages": [{"role": "user", "content": text}], "temperature": 0,
                "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        stamps: list[float] = []
        usage = 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for event in aparse_sse_lines(r.aiter_lines()):
                if not isinstance(event, dict) or "choices" not in event:
                    continue
                if event["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
                usage = event["usage"]["completion_tokens"]
        return stamps[0] - t0, gaps(stamps), usage, stamps[-1]

    limits = httpx.Limits(max_connections=len(texts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, t, t0) for t in texts))
    wall = max(r[3] for r in results) - t0
    return summarize([r[0] for r in results], [x for r in results for x in r[1]],
                     sum(r[2] for r in results), wall)


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "parallax.cli", "serve", "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--kv-memory", args.kv_memory,
           "--max-waiting", "256"]
    if args.model:
        cmd += ["-m", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("parallax serve exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("parallax serve did not become healthy")


# ---- in-process -----------------------------------------------------------------------------


class InProcess:
    def __init__(self, args) -> None:
        import torch

        from parallax.engine.engine import Engine, EngineConfig
        from parallax.models.loader import load_shard, load_tokenizer

        if args.threads:
            torch.set_num_threads(args.threads)
        shard = load_shard(args.model or None)
        self.tokenizer = load_tokenizer(shard.tokenizer_path)
        self.engine = Engine(shard.model, EngineConfig(
            kv_memory_bytes=parse_size(args.kv_memory), max_num_seqs=args.max_batch_size),
            [self.tokenizer.eos_token_id])

    def encode(self, text: str) -> list[int]:
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def run(self, texts: list[str], max_tokens: int, grammar: str | None = None) -> dict:
        from parallax.engine.sampling_params import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                grammar=grammar)
        ids = [self.encode(t) for t in texts]
        stamps: dict[str, list[float]] = {str(i): [] for i in range(len(texts))}
        t0 = time.perf_counter()
        for i, prompt in enumerate(ids):
            self.engine.add_request(str(i), prompt, params)
        tokens = 0
        while self.engine.has_work():
            outputs = self.engine.step()
            now = time.perf_counter()
            for o in outputs:
                if o.token_id is not None:
                    stamps[o.request_id].append(now)
                    tokens += 1
        wall = max(s[-1] for s in stamps.values()) - t0
        result = summarize([s[0] - t0 for s in stamps.values()],
                           [g for s in stamps.values() for g in gaps(s)], tokens, wall)
        # decode steps: from the last first token to the end, one token per request per step
        first = max(s[0] for s in stamps.values())
        result["step_ms"] = (wall - (first - t0)) / max(1, max_tokens - 1) * 1e3
        return result


# ---- grammar cost ---------------------------------------------------------------------------

ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "amount": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["color", "amount", "tags"],
    "additionalProperties": False,
}
LONG_SCHEMA = {"type": "array", "items": ITEM_SCHEMA, "minItems": 500}


def json_schema_bench(args) -> None:
    from parallax.models.quant.native import flags_summary
    from parallax.serving.structured import parse_response_format, tokenizer_json

    grammar = parse_response_format({"type": "json_schema", "json_schema": {
        "name": "items", "schema": LONG_SCHEMA}}).grammar
    local = InProcess(args)
    local.engine.set_grammar_vocab(tokenizer_json(local.tokenizer))
    local.run(prompts(2), 4)  # warm: model, vocabulary, mask thread
    local.run(prompts(2), 4, grammar)
    counts = [int(c) for c in (args.clients if args.clients != "1,8,32" else "1,16").split(",")]
    rows = []
    for n in counts:
        texts = [f"List items as JSON: {t}" for t in prompts(n)]
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # interleaved, best of: the machine may be shared
            for name, g in (("free", None), ("json_schema", grammar)):
                r = local.run(texts, args.max_tokens, g)
                if name not in best or r["step_ms"] < best[name]["step_ms"]:
                    best[name] = r
        rows.append((n, best["free"], best["json_schema"]))
        print(f"N={n}: free {best['free']['step_ms']:.1f} ms/step, json_schema "
              f"{best['json_schema']['step_ms']:.1f} ms/step", file=sys.stderr)
    print(f"\nmodel {args.model or 'SmolLM2-135M-Instruct'}, {args.max_tokens} tokens per request "
          f"(greedy), {os.cpu_count()} CPUs, threads {args.threads or 'default'}, "
          f"CPU flags {flags_summary()}, best of {args.repeats}\n")
    print("| batch | free ms/step | json_schema ms/step | free tok/s | json_schema tok/s "
          "| grammar cost per token |")
    print("|---|---|---|---|---|---|")
    for n, free, constrained in rows:
        cost = constrained["step_ms"] / free["step_ms"] - 1
        print(f"| {n} | {free['step_ms']:.1f} | {constrained['step_ms']:.1f} | "
              f"{free['tok_s']:.1f} | {constrained['tok_s']:.1f} | {cost:+.1%} |")


# ---- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--kv-memory", default="512MB")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json-schema", action="store_true",
                        help="measure grammar-constrained vs free decoding instead")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.json_schema:
        json_schema_bench(args)
        return
    counts = [int(c) for c in args.clients.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    print(f"starting parallax serve on {url} ...", file=sys.stderr)
    server = start_server(args, port)
    try:
        print("loading the in-process engine ...", file=sys.stderr)
        local = InProcess(args)
        asyncio.run(served_run(url, prompts(2), 4))  # warm both paths
        local.run(prompts(2), 4)
        rows = []
        for n in counts:
            texts = prompts(n)
            served = asyncio.run(served_run(url, texts, args.max_tokens))
            inproc = local.run(texts, args.max_tokens)
            rows.append((n, served, inproc))
            print(f"N={n}: served {served['tok_s']:.1f} tok/s, in-process "
                  f"{inproc['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(30)
    cpu = os.cpu_count()
    print(f"\nmodel {args.model or 'SmolLM2-135M-Instruct'}, {args.max_tokens} tokens per "
          f"request (greedy, ignore_eos), {cpu} CPUs, threads {args.threads or 'default'}\n")
    print("| clients | path | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | tok/s "
          "| overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for n, served, inproc in rows:
        overhead = 1 - served["tok_s"] / inproc["tok_s"]
        for name, r, extra in (("in-process engine", inproc, ""),
                               ("parallax serve", served, f"{overhead:.1%}")):
            print(f"| {n} | {name} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | "
                  f"{r['itl_p50']:.1f} | {r['itl_p99']:.1f} | {r['tok_s']:.1f} | {extra} |")


if __name__ == "__main__":
    main()
