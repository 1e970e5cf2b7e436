"""`parallax` command line: one subcommand per role; each builds a frozen config and runs it.

- `serve`: the whole model on this machine behind the OpenAI API.
- `run`: the scheduler (node registry, layer allocation, routing, the cluster's OpenAI API).
- `join`: a node that serves the layers the scheduler assigns to it.
- `chat`: the web UI on another machine, proxying its API calls to the scheduler.
- `gateway`: the password-protected backend of a phone app, in front of the scheduler.
- `status`: the cluster status in the terminal.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from parallax import _calltrace as calltrace
from parallax.config import (
    ACTIVATION_INT8_CHOICES,
    DTYPES,
    QUANTIZE_CHOICES,
    ConfigError,
    ServeConfig,
    parse_size,
)
from parallax.models.hub import DEFAULT_MODEL


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _add_secret(p, flag: str, env: str, what: str) -> None:
    """`--X` and `--X-file` for a secret that may also come from the environment variable
    `env` (a flag's value is visible to every user of the machine in `ps`)."""
    p.add_argument(flag, default=None,
                   help=f"{what} (default: ${env}; prefer that or {flag}-file: a flag shows "
                        "in the process list)")
    p.add_argument(f"{flag}-file", default=None, metavar="PATH",
                   help=f"read {what} from this file (its first line)")


def _secret(args: argparse.Namespace, flag: str, env: str) -> str | None:
    """The secret of `_add_secret`: from the flag, else its file, else the environment."""
    name = flag.lstrip("-").replace("-", "_")
    value, path = getattr(args, name), getattr(args, f"{name}_file")
    if value is not None and path is not None:
        raise ConfigError(f"give {flag} or {flag}-file, not both")
    if path is not None:
        try:
            lines = Path(path).expanduser().read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read {flag}-file {path}: {exc.strerror or exc}") from None
        value = lines[0].strip() if lines else ""
        if not value:
            raise ConfigError(f"{flag}-file {path} is empty")
        return value
    return value if value is not None else (os.environ.get(env) or None)


def _add_allowed_hosts(p) -> None:
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="HOST[,HOST...]",
                   help="when listening on a non-loopback address, answer only requests whose "
                        "Host header names one of these (default: any; loopback names always "
                        "work; a server on loopback answers only loopback names)")


def _hosts(values: list[str]) -> tuple[str, ...]:
    return tuple(h.strip() for value in values for h in value.split(",") if h.strip())


def _add_tls(p, ca_help: str | None) -> None:
    """`--tls-certfile/--tls-keyfile` (serve https) and `--tls-ca-file` (check the other side)."""
    p.add_argument("--tls-certfile", default=None, metavar="PEM",
                   help="serve https with this certificate (chain); needs --tls-keyfile")
    p.add_argument("--tls-keyfile", default=None, metavar="PEM",
                   help="the private key of --tls-certfile")
    if ca_help is not None:  # commands that call another server check its certificate
        p.add_argument("--tls-ca-file", default=None, metavar="PEM", help=ca_help)


def _tls(args: argparse.Namespace):
    from parallax.serving.tls import TLSConfig

    return TLSConfig(args.tls_certfile, args.tls_keyfile, getattr(args, "tls_ca_file", None))


def _add_p2p_options(p, port_default: int | None, port_help: str) -> None:
    p.add_argument("--p2p-port", type=int, default=port_default, help=port_help)
    p.add_argument("--relay", action="append", default=[], metavar="MULTIADDR",
                   help="P2P relay server (/ip4/.../tcp/N/p2p/12D3KooW...) for peers behind "
                        "NAT; also used to find peers (repeatable)")


def _add_quantize(p, help_text: str) -> None:
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                   help=f"{help_text}; default: keep the checkpoint's float weights")


def _add_activation_int8(p) -> None:
    p.add_argument("--activation-int8", default="auto", choices=ACTIVATION_INT8_CHOICES,
                   help="decode matmuls on packed GGUF weights round activations to int8 and "
                        "use integer dot products, as llama.cpp does (faster on CPU, a little "
                        "less exact); auto: on for models of 1B parameters or more (default)")


def _add_no_prefix_caching(p) -> None:
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="recompute every prompt from the start (default: reuse the KV of "
                        "prefixes seen before; in a pipeline a stage with caching off holds "
                        "no prefix, so the whole pipeline recomputes)")


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a whole model on this machine (OpenAI API, no scheduler)",
        description="Load a model on this machine and serve the OpenAI chat API at /v1.")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"built-in name, HF repo id, model dir, .gguf file, or a hub GGUF "
                        f"OWNER/REPO:QUANT or OWNER/REPO/FILE.gguf (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    _add_quantize(p, "quantize a float checkpoint's linear and embedding weights into GGUF "
                     "blocks as it loads (not for .gguf files, which stay packed as stored)")
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
    _add_activation_int8(p)
    _add_no_prefix_caching(p)
    _add_allowed_hosts(p)
    _add_tls(p, None)
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from parallax.node.serve import run_serve

    config = ServeConfig(
        model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        quantize=args.quantize, max_batch_size=args.max_batch_size, max_waiting=args.max_waiting,
        kv_memory_bytes=args.kv_memory, threads=args.threads, max_model_len=args.max_model_len,
        max_body_bytes=max(1, int(args.max_body_mb * 2**20)), warmup=not args.no_warmup,
        activation_int8=args.activation_int8, allowed_hosts=_hosts(args.allowed_hosts),
        tls=_tls(args), enable_prefix_caching=not args.no_prefix_caching,
    )
    return run_serve(config)


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="run the scheduler: nodes join it, it splits the model and serves the API",
        description="Start the scheduler. Nodes join with `parallax join -s HOST:PORT`; the "
                    "scheduler splits the model's layers across them and serves the OpenAI "
                    "chat API, the cluster status and the node join command.")
    p.add_argument("-m", "--model", default=None,
                   help="model to serve: built-in name, HF repo id, model dir, .gguf file, or a "
                        "hub GGUF OWNER/REPO:QUANT or OWNER/REPO/FILE.gguf (each node downloads "
                        "only its layers' bytes) (default: none yet; choose with POST "
                        "/scheduler/init)")
    p.add_argument("-n", "--init-nodes-num", type=_positive_int, default=1,
                   help="nodes to wait for before the first allocation (default 1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: nodes on this machine only; "
                        "0.0.0.0 lets other machines join)")
    p.add_argument("--port", type=int, default=3001, help="HTTP port (default 3001)")
    _add_secret(p, "--join-token", "PARALLAX_JOIN_TOKEN",
                "secret nodes must send to join (header X-Join-Token)")
    _add_secret(p, "--api-key", "PARALLAX_API_KEY",
                "require `Authorization: Bearer KEY` on /v1/* requests; also the operator's "
                "credential for the setup (POST /scheduler/init) and the join token")
    p.add_argument("--retry-attempts", type=int, default=20,
                   help="when every pipeline is busy, wait this many intervals before 429 "
                        "(default 20)")
    p.add_argument("--retry-interval", type=float, default=5.0,
                   help="seconds between routing retries (default 5)")
    p.add_argument("--heartbeat-timeout", type=float, default=15.0,
                   help="seconds without a heartbeat before a node is evicted (default 15)")
    p.add_argument("--replay-wait-s", type=float, default=120.0,
                   help="a request whose pipeline broke waits this long for a complete "
                        "pipeline to continue on (the stream stays open), then ends with an "
                        "error (default 120)")
    p.add_argument("--max-replays", type=int, default=3,
                   help="times one request is continued on another pipeline after failures; "
                        "then it fails (default 3; 0 turns replay off)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weight dtype nodes load (sizes memory figures; default float32, what "
                        "CPU nodes use; bfloat16 for CUDA nodes)")
    _add_quantize(p, "every node quantizes the model's float weights into GGUF blocks as it "
                     "loads, and memory is sized by them (float checkpoints only: with a .gguf "
                     "-m it is an error; the setup page's GGUF models ignore it)")
    p.add_argument("--add-model", action="append", default=[], metavar="PATH",
                   help="a local model dir or .gguf file to offer in /model/list (repeatable)")
    p.add_argument("--no-mdns", action="store_true",
                   help="do not advertise the scheduler on the local network")
    p.add_argument("--p2p", action="store_true",
                   help="also run a Lattica peer so nodes can join across the internet by "
                        "peer id (the join command then names it)")
    _add_p2p_options(p, 3003, "tcp port of the P2P peer (default 3003; open it for remote nodes)")
    p.add_argument("--max-queued", type=_positive_int, default=1024,
                   help="requests that may wait for a busy cluster; more get 429 at once "
                        "(default 1024)")
    _add_allowed_hosts(p)
    p.add_argument("--allow-advertised-hosts", action="append", default=[],
                   metavar="CIDR|HOST[,...]",
                   help="hosts a node may advertise (in its HTTP and activation addresses) "
                        "although its join comes from another address: nodes behind NAT, on "
                        "a second interface or behind proxies; networks (10.0.0.0/8), IPs, "
                        "host names or *.domain (default: none; a node may advertise only the "
                        "address it connects from, where this machine's loopback and LAN "
                        "addresses count as one)")
    _add_tls(p, "CA certificate(s) that nodes' certificates must chain to (default: "
                  "the system's CAs); with --tls-certfile only nodes that serve https may join")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.set_defaults(func=_run_scheduler)


def _run_scheduler(args: argparse.Namespace) -> int:
    from parallax.config import SchedulerConfig
    from parallax.scheduler.server import run_scheduler_process

    config = SchedulerConfig(
        model=args.model, init_nodes_num=args.init_nodes_num, host=args.host, port=args.port,
        join_token=_secret(args, "--join-token", "PARALLAX_JOIN_TOKEN"),
        api_key=_secret(args, "--api-key", "PARALLAX_API_KEY"),
        retry_attempts=args.retry_attempts,
        retry_interval_s=args.retry_interval, heartbeat_timeout_s=args.heartbeat_timeout,
        replay_wait_s=args.replay_wait_s, max_replays=args.max_replays,
        dtype=args.dtype, quantize=args.quantize, mdns=not args.no_mdns, local_models=tuple(args.add_model),
        p2p=args.p2p, p2p_port=args.p2p_port, relays=tuple(args.relay),
        max_queued=args.max_queued, allowed_hosts=_hosts(args.allowed_hosts), tls=_tls(args),
        allow_advertised_hosts=_hosts(args.allow_advertised_hosts),
    )
    return run_scheduler_process(config)


def _add_join(sub) -> None:
    p = sub.add_parser(
        "join", help="join a scheduler as a node and serve the layers it assigns",
        description="Join a Parallax cluster: measure this machine, report to the scheduler, "
                    "load the layer range it assigns, and serve it.")
    p.add_argument("-s", "--scheduler", default=None, metavar="HOST:PORT|PEER",
                   help="the scheduler's address, or its P2P peer id / multiaddr "
                        "(/ip4/.../tcp/3003/p2p/12D3KooW...) for a `parallax run --p2p` "
                        "scheduler (default: find one on the local network)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; use 0.0.0.0 so nodes on "
                        "other machines can reach this one)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    p.add_argument("--activation-port", type=int, default=None,
                   help="ZeroMQ port for activations from other nodes (default: port + 100)")
    p.add_argument("--advertise-host", default=None,
                   help="address other machines use to reach this node (default: from --host); "
                        "the scheduler admits it only if it is the address this node's join "
                        "comes from, or its --allow-advertised-hosts lists it")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--memory", type=_size, default=None, metavar="SIZE",
                   help="budget for weights + KV cache, e.g. 8GB (default: free memory)")
    p.add_argument("--kv-memory", type=_size, default=None, metavar="SIZE",
                   help="KV cache budget of this stage, e.g. 512MB (default: --memory less "
                        "the assigned layers' weights, or the executor's default share)")
    _add_secret(p, "--join-token", "PARALLAX_JOIN_TOKEN",
                "the cluster's join token, if it has one")
    p.add_argument("--max-batch-size", type=_positive_int, default=32,
                   help="requests decoded together (default 32)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for the model (default: torch's choice)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up step")
    _add_activation_int8(p)
    _add_no_prefix_caching(p)
    p.add_argument("--probe-interval", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="how often to re-measure RTT and bandwidth to the peers the scheduler "
                        "lists (default 30)")
    _add_p2p_options(p, None, "tcp port of this node's P2P peer when -s names a peer "
                              "(default: port + 200)")
    _add_allowed_hosts(p)
    _add_tls(p, "CA certificate(s) that the scheduler's certificate must chain to "
                  "(default: the system's CAs); with --tls-certfile this node also encrypts its "
                  "activation links (ZeroMQ CURVE)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.set_defaults(func=_run_join)


def _run_join(args: argparse.Namespace) -> int:
    from parallax.config import JoinConfig
    from parallax.node.join import run_join

    config = JoinConfig(
        scheduler=args.scheduler, host=args.host, port=args.port,
        activation_port=args.activation_port, advertise_host=args.advertise_host,
        device=args.device, dtype=args.dtype, memory_bytes=args.memory,
        kv_memory_bytes=args.kv_memory,
        join_token=_secret(args, "--join-token", "PARALLAX_JOIN_TOKEN"),
        max_batch_size=args.max_batch_size, threads=args.threads,
        warmup=not args.no_warmup, activation_int8=args.activation_int8,
        p2p_port=args.p2p_port, relays=tuple(args.relay),
        allowed_hosts=_hosts(args.allowed_hosts), tls=_tls(args),
        enable_prefix_caching=not args.no_prefix_caching,
        probe_interval_s=args.probe_interval,
    )
    return run_join(config)


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat", help="serve the web chat on this machine, proxying to a scheduler",
        description="Serve the web UI (setup, nodes, chat) on a machine that is not a node; its "
                    "API calls are proxied to the scheduler, streams as they arrive.")
    p.add_argument("-s", "--scheduler", default="127.0.0.1:3001", metavar="HOST:PORT|PEER",
                   help="the scheduler (`parallax run`) to talk to, or its P2P peer id / "
                        "multiaddr (default 127.0.0.1:3001)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0 to open the chat to the network)")
    p.add_argument("--port", type=int, default=3002, help="HTTP port (default 3002)")
    _add_p2p_options(p, 0, "tcp port of the P2P peer when -s names a peer (default: any free)")
    _add_allowed_hosts(p)
    _add_tls(p, "CA certificate(s) that the scheduler's certificate must chain to; "
                  "with it (or an https:// -s) the scheduler is reached over https")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from parallax.chat.server import run_chat
    from parallax.config import ChatConfig

    return run_chat(ChatConfig(scheduler=args.scheduler, host=args.host, port=args.port,
                               p2p_port=args.p2p_port, relays=tuple(args.relay),
                               allowed_hosts=_hosts(args.allowed_hosts), tls=_tls(args)))


def _add_gateway(sub) -> None:
    p = sub.add_parser(
        "gateway", help="password-protected backend for a phone app, in front of a scheduler",
        description="Serve POST /chat, POST /chat/stream and GET /cluster/status; every request "
                    "needs `Authorization: Bearer PASSWORD`.")
    p.add_argument("-s", "--scheduler", default="127.0.0.1:3001", metavar="HOST:PORT",
                   help="the scheduler (`parallax run`) to talk to (default 127.0.0.1:3001)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 so a phone on the "
                        "network can reach it)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    _add_secret(p, "--password", "PARALLAX_GATEWAY_PASSWORD",
                "password clients send as `Authorization: Bearer PASSWORD` (required)")
    _add_secret(p, "--api-key", "PARALLAX_API_KEY",
                "the scheduler's API key, sent upstream as a Bearer token")
    _add_allowed_hosts(p)
    _add_tls(p, "CA certificate(s) that the scheduler's certificate must chain to; "
                  "with it (or an https:// -s) the scheduler is reached over https")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.set_defaults(func=_run_gateway)


def _run_gateway(args: argparse.Namespace) -> int:
    from parallax.config import GatewayConfig
    from parallax.gateway.server import run_gateway

    config = GatewayConfig(
        scheduler=args.scheduler, host=args.host, port=args.port,
        password=_secret(args, "--password", "PARALLAX_GATEWAY_PASSWORD"),
        api_key=_secret(args, "--api-key", "PARALLAX_API_KEY"),
        allowed_hosts=_hosts(args.allowed_hosts), tls=_tls(args),
    )
    return run_gateway(config)


def _add_status(sub) -> None:
    p = sub.add_parser(
        "status", help="show the cluster (nodes, pipelines, ms/token per stage) live",
        description="Print the scheduler's cluster view in this terminal and refresh it live "
                    "(Ctrl-C quits): every node's status, layers and load, every pipeline's "
                    "stages with their compute ms per token, the slowest stage marked.")
    p.add_argument("-s", "--scheduler", default="127.0.0.1:3001", metavar="HOST:PORT",
                   help="the scheduler (`parallax run`) to read (default 127.0.0.1:3001)")
    _add_secret(p, "--api-key", "PARALLAX_API_KEY",
                "the scheduler's API key (optional: with it the view shows the real join "
                "command)")
    p.add_argument("--once", action="store_true", help="print the view once and exit")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--tls-ca-file", default=None, metavar="PEM",
                   help="CA certificate(s) that the scheduler's certificate must chain to; "
                        "with it (or an https:// -s) the scheduler is read over https")
    p.set_defaults(func=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from parallax.serving.tls import TLSConfig
    from parallax.status_view import SchedulerUnreachable, run_status

    if not 0.1 <= args.interval <= 3600:
        raise ConfigError(f"--interval must be from 0.1 to 3600 seconds, got {args.interval:g}")
    try:
        return run_status(args.scheduler, api_key=_secret(args, "--api-key", "PARALLAX_API_KEY"),
                          tls=TLSConfig(ca_file=args.tls_ca_file), once=args.once,
                          interval_s=args.interval)
    except SchedulerUnreachable as exc:
        print(f"parallax status: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parallax", description="Decentralized LLM inference: split a model's layers "
                                     "across ordinary machines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    _add_run(sub)
    _add_join(sub)
    _add_chat(sub)
    _add_gateway(sub)
    _add_status(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`parallax ...`)."""
    calltrace.install()  # test-only (PARALLAX_TRACE_CALLS); nothing when unset
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
