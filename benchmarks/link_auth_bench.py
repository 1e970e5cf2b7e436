"""What authenticating a stage message costs: seal (sender) and check (receiver) per message.

    .venv/bin/python benchmarks/link_auth_bench.py [--hidden 576] [--rounds 200]

Sizes: a full prefill chunk (512 tokens), a batch of 8 decode tokens, and one decode token, in
fp32 at the built-in model's hidden size. Prints the median microseconds per operation and
the throughput, next to a plain memory copy of the same bytes for scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from parallax.node.link_auth import LinkSecurity
from parallax.protocol.common import encode
from parallax.protocol.links import ActivationEntry, LinkActivations
from parallax.protocol.tensors import hidden_frame


def _median_us(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def measure(num_tokens: int, hidden_size: int, rounds: int) -> dict[str, float]:
    """Median µs to seal, to check, and to copy one message of `num_tokens` activations."""
    key = os.urandom(32)
    sender, receiver = LinkSecurity(key, ()), LinkSecurity(key, ())
    hidden = torch.randn(num_tokens, hidden_size)
    entries = [ActivationEntry(f"r{i}", [1], 5) for i in range(min(num_tokens, 8))]
    frames = [encode(LinkActivations(entries, "float32", hidden_size)), hidden_frame(hidden)[1]]
    sealed: list[list] = []

    def seal() -> None:
        sealed.append([sender.seal(frames), *frames])

    seal_us = _median_us(seal, rounds)
    messages = iter(sealed)

    def check() -> None:
        assert receiver.check(next(messages)) is None

    check_us = _median_us(check, rounds)
    copy_us = _median_us(lambda: hidden.clone(), rounds)
    num_bytes = hidden.numel() * 4
    return {"bytes": num_bytes, "seal_us": seal_us, "check_us": check_us, "copy_us": copy_us,
            "GB/s": num_bytes / (check_us * 1e-6) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(f"{'message':<22}{'bytes':>10}{'seal µs':>10}{'check µs':>10}{'copy µs':>10}"
          f"{'check GB/s':>12}")
    for label, tokens in (("prefill 512 tokens", 512), ("decode batch of 8", 8),
                          ("decode 1 token", 1)):
        row = measure(tokens, args.hidden, args.rounds)
        print(f"{label:<22}{row['bytes']:>10}{row['seal_us']:>10.1f}{row['check_us']:>10.1f}"
              f"{row['copy_us']:>10.1f}{row['GB/s']:>12.2f}")


if __name__ == "__main__":
    main()
