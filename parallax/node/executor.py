"""The executor process: owns the model shard, the KV cache and the engine loop.

Started by the frontend as `python -m parallax.node.executor --config JSON --input ADDR --output
ADDR --parent-pid PID`. It connects a PULL socket to the frontend's `--input` address (requests,
aborts) and a PUSH socket to `--output` (progress, ready, step outputs, crash report). One entry
point, `run_executor_process`, wraps everything in a top-level handler that reports a crash to the
frontend before exiting. The process dies with its parent (PR_SET_PDEATHSIG on Linux, and a
parent-pid check in the loop everywhere).

The loop: drain incoming messages without blocking while the engine has work (block with a short
timeout while idle), run one engine step, send that step's outputs as one batch. A failing request
fails alone: `add_request` errors and step errors become error outputs for the requests involved.

In a pipeline the executor also binds its stage's activation port (node/links.py
`PipelineLinks`, one more socket on the same poller) and hands everything stage-related to a
`StageRouter` (node/stage.py): the links' messages (`on_message`), each step's outputs
(`after_step`: hidden states to the next stage, tokens back to the head) and lost peers
(`check_peers`). `_publish` only ever talks to this node's frontend.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import zmq

from parallax import _calltrace as calltrace
from parallax.config import ExecutorConfig
from parallax.engine.engine import StepFailed, StepOutput
from parallax.node.link_auth import parse_key
from parallax.node.link_crypto import CurveKeyPair
from parallax.node.links import LinkLimits, PipelineLinks
from parallax.node.stage import RouteRejected, StageRouter, error_output, token_output
from parallax.node.tracing import StageTracer, step_delay_s
from parallax.protocol.common import (
    INVALID_REQUEST,
    PEER_LOST,
    DownloadProgress,
    TokenOutput,
    encode,
)
from parallax.protocol.ipc import (
    AbortRequest,
    AddRequest,
    ExecutorError,
    ExecutorProgress,
    ExecutorReady,
    ExecutorStats,
    SetGrammarVocab,
    SetLinkAliases,
    SetLinkSecurity,
    Shutdown,
    StepOutputs,
    ToExecutor,
    decode_to_executor,
)

if TYPE_CHECKING:
    from parallax.models.range_cache import Progress

logger = logging.getLogger("parallax.executor")

PROCESS_TITLE = "parallax-executor"
IDLE_POLL_MS = 50
FLUSH_POLL_MS = 2  # idle, but messages wait for a peer that is not connected yet
MAX_LINK_MESSAGES = 1024  # per drain, so a flood of stage messages cannot starve the engine
PEER_CHECK_S = 0.2
PARENT_CHECK_S = 0.5
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL us when the parent exits; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)


def _set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # optional nicety
        pass


def _default_kv_bytes(device: str) -> int:
    """KV budget when none is given: half of free GPU memory, or min(1 GiB, 1/4 of free RAM)."""
    import torch

    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.5)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * 2**30
    return max(64 * 2**20, min(2**30, available // 4))


def _eos_token_ids(config, source) -> list[int]:
    """EOS ids from the model config, plus generation_config.json of a model directory."""
    ids: list[int] = []

    def add(value) -> None:
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(int(v) for v in value if isinstance(v, int))

    add(getattr(config, "eos_token_id", None))
    if source.kind == "dir":
        path = os.path.join(source.path, "generation_config.json")
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    add(msgspec.json.decode(f.read()).get("eos_token_id"))
            except (OSError, msgspec.DecodeError, AttributeError):
                pass
    return list(dict.fromkeys(ids))


class ExecutorLoop:
    """The engine loop of one executor; sockets are connected by the caller."""

    def __init__(self, engine, pull: zmq.Socket, push: zmq.Socket,
                 parent_pid: int | None = None, links: PipelineLinks | None = None) -> None:
        self.engine = engine
        self.pull = pull
        self.push = push
        self.parent_pid = parent_pid
        self.poller = zmq.Poller()
        self.poller.register(pull, zmq.POLLIN)
        self.links = links
        model = getattr(engine, "model", None)
        self.tracer = StageTracer(getattr(model, "start_layer", 0), getattr(model, "end_layer", 0))
        self.step_delay_s = step_delay_s()  # test-only: make this node the slow one
        self.last_step = (0.0, 0)  # (ms, requests) of the step just taken
        self.stage = StageRouter(engine, links, self.tracer) if links is not None else None
        if links is not None:
            self.poller.register(links.pull, zmq.POLLIN)
        self.layer_latency_ms = 0.0
        self._next_peer_check = 0.0
        self.running = True
        self._pending: list[TokenOutput] = []  # outputs produced outside a step
        self._dirty = False  # stats changed without a step (abort): publish them
        self._next_parent_check = 0.0

    def handle(self, message: ToExecutor) -> None:
        """Apply one control message to the engine; a bad request fails only itself."""
        if isinstance(message, AddRequest):
            self.tracer.forget(message.rid)
            self.tracer.ready(message.rid)
            try:
                if message.downstream and self.stage is not None:
                    self.stage.add_request(message)
                elif message.downstream:
                    raise RouteRejected("this node is not part of a pipeline")
                else:
                    self.engine.add_request(message.rid, list(message.prompt_token_ids),
                                            message.sampling_params, message.num_resumed_tokens)
            except (ValueError, RuntimeError) as exc:
                # a table naming stages this node does not link to is the cluster changing
                # (replay elsewhere); anything else the engine refused is the request's fault
                kind = PEER_LOST if isinstance(exc, RouteRejected) else INVALID_REQUEST
                self._pending.append(TokenOutput(message.rid, finished=True,
                                                 finish_reason="error", error=str(exc),
                                                 kind=kind))
            self._dirty = True
        elif isinstance(message, AbortRequest):
            if self.stage is not None:
                self.stage.abort(list(message.rids))
            else:
                for rid in message.rids:
                    self.engine.abort(rid)
            for rid in message.rids:
                self.tracer.forget(rid)
            self._dirty = True
        elif isinstance(message, SetLinkAliases):
            if self.links is not None:
                self.links.set_aliases(dict(message.aliases))
        elif isinstance(message, SetLinkSecurity):
            if self.links is not None:
                self.links.set_security(parse_key(message.key), list(message.peers),
                                        list(message.curve_keys))
            if self.stage is not None:
                self._pending.extend(self.stage.drop_orphans())
                self._dirty = True
        elif isinstance(message, SetGrammarVocab):
            self.engine.set_grammar_vocab(message.tokenizer_json)
        elif isinstance(message, Shutdown):
            self.running = False

    def _drain_links(self) -> None:
        """Apply waiting stage messages; one that fails is dropped and never stops the loop
        (PipelineLinks.receive already dropped the invalid ones)."""
        if self.links is None:
            return
        for _ in range(MAX_LINK_MESSAGES):
            try:
                received = self.links.receive()
                if received is None:
                    return
                self._pending.extend(self.stage.on_message(*received))
            except Exception:  # noqa: BLE001 - per message: the engine loop must go on
                logger.exception("dropped a stage message that could not be applied")
            self._dirty = True

    def _drain(self) -> None:
        self._drain_links()
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = decode_to_executor(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.error("dropping an undecodable message (%d bytes): %s", len(data), exc)
                continue
            self.handle(message)

    def _step(self) -> list[TokenOutput]:
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
            if outputs and self.step_delay_s:  # test-only: a step that ran something is slow
                time.sleep(self.step_delay_s)
        except StepFailed as exc:  # the batch's forward failed: fail its requests only
            logger.error("engine step failed for %d requests: %s", len(exc.request_ids), exc,
                         exc_info=exc.__cause__)
            return self._fail_requests(exc.request_ids, f"the engine failed: {exc}")
        except Exception as exc:  # last resort: fail the requests of this engine, keep the process
            logger.exception("engine step failed; failing every request in the engine")
            return self._fail_all(f"the engine failed: {type(exc).__name__}: {exc}")
        if outputs:
            step_ms = (time.perf_counter() - started) * 1000
            num_layers = getattr(self.engine, "num_local_layers", 1) or 1
            per_layer = step_ms / num_layers
            self.layer_latency_ms = per_layer if not self.layer_latency_ms else (
                0.8 * self.layer_latency_ms + 0.2 * per_layer)
            ran = [o.request_id for o in outputs if o.finish_reason != "error"]
            self.tracer.on_step(started * 1000, step_ms, ran)
            self.last_step = (step_ms, len(set(ran)))
        if self.stage is not None:
            return self.stage.after_step(outputs)
        return [token_output(o, self.tracer) for o in outputs]  # the whole model is here

    def _fail_all(self, message: str) -> list[TokenOutput]:
        return self._fail_requests(list(self.engine.sequences), message)

    def _fail_requests(self, rids: list[str], message: str) -> list[TokenOutput]:
        """Abort `rids` and report them failed where their client waits.

        A head (or a lone node) tells its frontend and releases the later stages; a later stage
        sends the errors to each request's head (through the stage router), which releases the
        chain: its own frontend never had these requests.
        """
        for rid in rids:
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - state is broken anyway; report and go on
                logger.exception("abort of %s failed", rid)
                self.engine.sequences.pop(rid, None)
        if self.stage is not None and not self.engine.is_first:
            return self.stage.after_step([StepOutput(rid, finished=True, finish_reason="error",
                                                     error=message) for rid in rids])
        if self.stage is not None:
            self.stage.abort(rids)  # frees the request on every later stage
        return [error_output(rid, message) for rid in rids]

    def _publish(self, outputs: list[TokenOutput]) -> None:
        e = self.engine
        step_ms, num_batched = self.last_step
        self.last_step = (0.0, 0)  # each step is reported once
        stats = ExecutorStats(e.num_running, e.num_waiting, e.num_free_blocks,
                              e.num_total_blocks, round(self.layer_latency_ms, 3),
                              getattr(e, "num_prefill_tokens", 0),
                              getattr(e, "num_decode_tokens", 0), round(step_ms, 3),
                              num_batched, getattr(e, "num_prefix_hit_tokens", 0),
                              getattr(e, "num_prefix_recomputed_tokens", 0),
                              self.links.num_activation_bytes_sent if self.links else 0)
        self.push.send(encode(StepOutputs(outputs, stats, self.tracer.take_link_samples())))

    def _check_parent(self) -> None:
        now = time.monotonic()
        if now < self._next_parent_check:
            return
        self._next_parent_check = now + PARENT_CHECK_S
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.warning("the frontend is gone; exiting")
            self.running = False

    def run_once(self, idle_timeout_ms: int = IDLE_POLL_MS) -> None:
        """One iteration: take messages (wait up to the timeout only when idle), step, publish."""
        timeout = 0 if self.engine.has_work() else idle_timeout_ms
        if self.links is not None and self.links.has_pending:
            timeout = min(timeout, FLUSH_POLL_MS)
        if self.poller.poll(timeout):
            self._drain()
        if self.links is not None and self.links.has_pending:
            self.links.flush()  # never blocks: a peer slow to connect is retried next time
        if self.stage is not None and time.monotonic() >= self._next_peer_check:
            self._next_peer_check = time.monotonic() + PEER_CHECK_S
            self._pending.extend(self.stage.check_peers())
        outputs, self._pending = self._pending, []
        if self.running and self.engine.has_work():
            outputs.extend(self._step())
        if outputs or self._dirty:
            self._dirty = False
            self._publish(outputs)

    def run(self) -> None:
        """Loop until Shutdown or until the parent process is gone."""
        while self.running:
            self.run_once()
            self._check_parent()


def _build_engine(config: ExecutorConfig, report, on_download=None):
    """Load the shard, size the KV cache, warm up. Returns (engine, ready message)."""
    import torch

    from parallax.engine.engine import Engine, EngineConfig
    from parallax.engine.sampling_params import SamplingParams
    from parallax.models.decode_plan import decode_step_path
    from parallax.models.loader import load_shard
    from parallax.models.quant.loading import (
        activation_int8_wanted,
        kernel_summary,
        set_activation_int8,
    )
    from parallax.models.sizing import formula_param_counts

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    dtype = getattr(torch, config.dtype)
    started = time.perf_counter()
    quantized = f", quantized to {config.quantize}" if config.quantize else ""
    report(f"loading {config.model or 'the built-in model'} on {config.device} "
           f"({config.dtype}{quantized})")
    shard = load_shard(config.model, config.start_layer, config.end_layer, config.device, dtype,
                       on_download, quantize=config.quantize)
    load_seconds = time.perf_counter() - started
    layer, embedding, head = formula_param_counts(shard.config)
    num_params = layer * shard.config.num_hidden_layers + embedding + head
    int8 = activation_int8_wanted(config.activation_int8, num_params)
    int8_segments = set_activation_int8(shard.model, int8)
    kv_bytes = config.kv_memory_bytes or _default_kv_bytes(config.device)
    eos_ids = _eos_token_ids(shard.config, shard.source)
    engine = Engine(
        shard.model,
        EngineConfig(kv_memory_bytes=kv_bytes, block_size=config.block_size,
                     max_num_seqs=config.max_batch_size,
                     max_num_batched_tokens=config.max_num_batched_tokens,
                     max_model_len=config.max_model_len,
                     enable_prefix_caching=config.enable_prefix_caching,
                     device=config.device, dtype=dtype),
        eos_ids,
    )
    kernels = kernel_summary(shard.model)
    decode_step = decode_step_path(shard.model)
    report(f"decode steps: {decode_step}")
    report(f"loaded {shard.source.name} in {load_seconds:.1f} s "
           f"({shard.read_log.num_bytes / 1e6:.0f} MB read); KV cache "
           f"{engine.num_total_blocks} blocks of {config.block_size} tokens "
           f"({kv_bytes / 2**20:.0f} MiB)")
    if kernels:  # which kernel each packed weight type multiplies with (also in /health)
        report("packed weights: " + ", ".join(f"{t} -> {p}" for t, p in kernels.items()))
        report(f"decode activations: {'int8' if int8_segments else 'fp32'} "
               f"(--activation-int8 {config.activation_int8}, {num_params / 1e9:.2f} B params"
               + ("" if int8_segments or not int8 else "; no int8 kernel on this build") + ")")
    if config.warmup and engine.is_first and engine.is_last:
        report("warming up")
        engine.add_request("__warmup__", [1 + i % 7 for i in range(8)],
                           SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while engine.has_work():
            engine.step()
    end_layer = config.end_layer if config.end_layer is not None else \
        shard.config.num_hidden_layers
    ready = ExecutorReady(
        pid=os.getpid(), model_name=shard.source.name,
        model_type=str(getattr(shard.config, "model_type", "")),
        start_layer=config.start_layer, end_layer=end_layer,
        num_layers=int(shard.config.num_hidden_layers), max_model_len=engine.max_model_len,
        block_size=config.block_size, num_total_blocks=engine.num_total_blocks,
        eos_token_ids=eos_ids, tokenizer_path=shard.tokenizer_path, device=config.device,
        dtype=config.dtype, load_seconds=round(load_seconds, 2),
        kernels=kernels, decode_step=decode_step,
    )
    return engine, ready


def _download_reporter(push) -> Callable[[Progress], None]:
    """Send a hub download's progress to the frontend (its log and heartbeats)."""
    def send(progress: Progress) -> None:
        # (bytes between two close tensors come along, so done may pass what was wanted)
        download = DownloadProgress(progress.done, max(progress.done, progress.wanted),
                                    round(progress.rate), round(progress.eta_s, 1))
        push.send(encode(ExecutorProgress(progress.text(), download)))
    return send


def run_executor_process(
    config: ExecutorConfig, input_address: str, output_address: str,
    parent_pid: int | None = None,
) -> int:
    """Process entry: connect, load, announce ready, loop. Returns the exit code.

    Any exception escaping start-up or the loop is sent to the frontend as `ExecutorError`
    (with the traceback) before the process exits with code 1.
    """
    _die_with_parent(parent_pid)
    _set_title(PROCESS_TITLE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when we stop
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(input_address)
    push.connect(output_address)
    started = False
    links = None
    try:
        engine, ready = _build_engine(
            config, lambda text: push.send(encode(ExecutorProgress(text))),
            _download_reporter(push))
        if config.activation_bind:  # bound once the shard says what a valid message holds
            curve = CurveKeyPair.generate() if config.link_encryption else None
            links = PipelineLinks(context, config.activation_bind,
                                  config.activation_endpoint or config.activation_bind,
                                  LinkLimits.of(engine, config.max_num_batched_tokens),
                                  curve=curve)
            if curve is not None:  # peers learn it through the scheduler (link_crypto.py)
                ready = msgspec.structs.replace(ready,
                                                curve_public_key=curve.public.decode("ascii"))
        push.send(encode(ready))
        started = True
        ExecutorLoop(engine, pull, push, parent_pid, links).run()
        return 0
    except BaseException as exc:  # noqa: BLE001 - report everything, then die
        if started:  # start-up failures are reported by the frontend
            logger.error("executor failed: %s", exc, exc_info=True)
        message = str(exc) or type(exc).__name__
        try:
            push.send(encode(ExecutorError(os.getpid(), message, traceback.format_exc(),
                                           during_startup=not started)))
        except zmq.ZMQError:
            pass
        return 1
    finally:
        if links is not None:
            links.close()
        pull.close()
        push.close()
        context.term()


def main(argv: list[str] | None = None) -> int:
    """`python -m parallax.node.executor` (started by the frontend, not by users)."""
    calltrace.install()  # test-only (PARALLAX_TRACE_CALLS); nothing when unset
    parser = argparse.ArgumentParser(prog="parallax-executor")
    parser.add_argument("--config", required=True, help="ExecutorConfig as JSON")
    parser.add_argument("--input", required=True, help="address to PULL requests from")
    parser.add_argument("--output", required=True, help="address to PUSH outputs to")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = msgspec.json.decode(args.config.encode(), type=ExecutorConfig)
    return run_executor_process(config, args.input, args.output, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
