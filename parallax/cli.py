"""`parallax` command line: one subcommand per role; each builds a frozen config and runs it.

Available now: `serve` (the whole model on this machine behind the OpenAI API).
"""

from __future__ import annotations

import argparse
import logging
import sys

from parallax.config import DTYPES, ConfigError, ServeConfig, parse_size
from parallax.models.hub import DEFAULT_MODEL


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a whole model on this machine (OpenAI API, no scheduler)",
        description="Load a model on this machine and serve the OpenAI chat API at /v1.")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"built-in name, HF repo id, model dir or .gguf file "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--max-batch-size", type=_positive_int, default=32,
                   help="requests decoded together (default 32)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests queued beyond the batch before answering 429 (default 64)")
    p.add_argument("--kv-memory", type=_size, default=None, metavar="SIZE",
                   help="KV cache budget, e.g. 2GB or 512MB; a bare number is GB "
                        "(default: half of free GPU memory, or min(1 GB, 1/4 of free RAM))")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for the model (default: torch's choice)")
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="context length cap (default: the model's)")
    p.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest accepted request body in MB; larger ones get 413 (default 4)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up step")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from parallax.node.serve import run_serve

    config = ServeConfig(
        model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        max_batch_size=args.max_batch_size, max_waiting=args.max_waiting,
        kv_memory_bytes=args.kv_memory, threads=args.threads, max_model_len=args.max_model_len,
        max_body_bytes=max(1, int(args.max_body_mb * 2**20)), warmup=not args.no_warmup,
    )
    return run_serve(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parallax", description="Decentralized LLM inference: split a model's layers "
                                     "across ordinary machines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`parallax ...`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"parallax {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
