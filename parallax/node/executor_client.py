"""The frontend's side of the executor: its process, the two ZeroMQ sockets, per-request queues.

`ExecutorClient` binds a PUSH socket (requests) and a PULL socket (outputs) on `ipc://` paths in a
private temp dir, starts the executor process (which connects to both), and routes every
`TokenOutput` to the asyncio queue of its request. It watches the process: when the executor
crashes (an `ExecutorError` report or an exit), every in-flight request gets an `ExecutorLost`
item, the state goes back to "loading" and a new executor is started. The state is "error" when
the executor cannot be started (the first start failed, or `max_restarts` starts in a row).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio

from parallax.config import ExecutorConfig
from parallax.node.link_auth import parse_key
from parallax.node.link_crypto import link_fingerprint
from parallax.protocol.common import ENGINE_ERROR, DownloadProgress, TokenOutput, encode
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
    decode_from_executor,
)

logger = logging.getLogger("parallax.frontend")

WATCH_INTERVAL_S = 0.1
SHUTDOWN_GRACE_S = 3.0


# ExecutorStats counters a node keeps across executor restarts (its /health totals)
TOTALS = ("num_prefill_tokens", "num_decode_tokens", "num_prefix_hit_tokens",
          "num_prefix_recomputed_tokens", "num_activation_bytes_sent")


class ProcessHandle(Protocol):
    """What the client needs of a started executor (subprocess.Popen fits)."""

    pid: int

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


Launcher = Callable[[ExecutorConfig, str, str], ProcessHandle]


def launch_executor_process(config: ExecutorConfig, input_address: str,
                            output_address: str) -> subprocess.Popen:
    """Start `python -m parallax.node.executor` as a child of this process."""
    command = [
        sys.executable, "-m", "parallax.node.executor",
        "--config", msgspec.json.encode(config).decode(),
        "--input", input_address, "--output", output_address,
        "--parent-pid", str(os.getpid()),
    ]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


@dataclass(frozen=True)
class ExecutorLost:
    """Queue item: the executor died (or was replaced) before this request finished."""

    message: str
    kind: str = ENGINE_ERROR


class NotReadyError(Exception):
    """The executor is not ready (loading, restarting or failed)."""


class ExecutorClient:
    """Owns the executor process and its sockets; one queue per in-flight request."""

    def __init__(
        self,
        config: ExecutorConfig | None,
        launcher: Launcher = launch_executor_process,
        max_restarts: int = 5,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.launcher = launcher
        self.max_restarts = max_restarts
        self.on_progress = on_progress or (lambda text: None)
        self.state = "loading"  # idle | loading | ready | error | stopped
        self.error: str | None = None
        self.info: ExecutorReady | None = None  # the latest ready executor's facts
        self.download: DownloadProgress | None = None  # the loading executor's hub download
        self.stats = ExecutorStats()
        self.on_step: Callable[[StepOutputs], None] | None = None  # metrics of each step
        self.num_restarts = 0
        self.requests: dict[str, asyncio.Queue] = {}
        # token / byte counters of executors that are gone (their stats reset with them)
        self._base = dict.fromkeys(TOTALS, 0)
        self._failed_starts = 0
        self._process: ProcessHandle | None = None
        self._ready_event = asyncio.Event()
        self._dir = tempfile.mkdtemp(prefix="parallax-")
        self.input_address = f"ipc://{self._dir}/to-executor"
        self.output_address = f"ipc://{self._dir}/from-executor"
        self._context = zmq.asyncio.Context()
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a connected executor
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 100_000)
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._push.bind(self.input_address)
        self._pull.bind(self.output_address)
        self._dead: list[ProcessHandle] = []  # killed executors not yet reaped
        self._tasks: list[asyncio.Task] = []
        self._restart_task: asyncio.Task | None = None
        self.link_aliases: dict[str, str] = {}
        self.link_security = SetLinkSecurity("", [])  # from the scheduler, kept across restarts
        self.grammar_vocab: SetGrammarVocab | None = None  # the model's, kept across restarts
        self._vocab_model: str | None = None  # the model grammar_vocab belongs to
        self.shutting_down = False  # set on SIGTERM: an executor dying now is not restarted

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the executor and the receive / watch tasks (returns before it is ready).

        Without a config (a node waiting for its layers) the state is "idle" until
        `reconfigure` gives it one.
        """
        if self.config is None:
            self.state = "idle"
        else:
            self._spawn()
        self._tasks = [asyncio.create_task(self._receive_loop(), name="executor-recv"),
                       asyncio.create_task(self._watch_loop(), name="executor-watch")]

    def _spawn(self) -> None:
        self.state = "loading"
        self.info = None
        self.download = None
        self.stats = ExecutorStats()
        self._process = self.launcher(self.config, self.input_address, self.output_address)

    async def _stop_process(self, process: ProcessHandle | None) -> None:
        """Ask an executor to shut down; kill it after the grace period."""
        if process is None or process.poll() is not None:
            return
        self._send(Shutdown())
        for _ in range(int(SHUTDOWN_GRACE_S / WATCH_INTERVAL_S)):
            if process.poll() is not None:
                return
            await asyncio.sleep(WATCH_INTERVAL_S)
        process.kill()
        self._dead.append(process)

    async def reconfigure(self, config: ExecutorConfig | None) -> None:
        """Replace the executor (new layers, or none): in-flight requests fail, it reloads."""
        self._fail_all("the node is switching to a new layer range")
        # not "ready" while the old executor stops: a request submitted now would reach an
        # executor that exits without answering, and wait forever
        self.state = "loading"
        self._add_totals()
        process, self._process = self._process, None
        await self._stop_process(process)
        if config is not None and config.model != self._vocab_model:
            self.grammar_vocab = None  # another model: its frontend sends the new one
        self.config = config
        self._ready_event = asyncio.Event()
        self.info, self.error, self._failed_starts = None, None, 0
        self.stats = ExecutorStats()
        if config is None:
            self.state = "idle"
        else:
            self._spawn()

    async def wait_ready(self) -> ExecutorReady:
        """Wait until an executor is ready; raise NotReadyError if it cannot start."""
        await self._ready_event.wait()
        if self.state != "ready" or self.info is None:
            raise NotReadyError(self.error or "the executor did not start")
        return self.info

    def begin_shutdown(self) -> None:
        """The process is stopping (SIGTERM reaches the executor too): do not restart it."""
        self.shutting_down = True

    async def close(self) -> None:
        """Stop the executor (Shutdown, then kill after a grace period) and free the sockets."""
        self.state = "stopped"
        for task in [*self._tasks, self._restart_task]:
            if task is not None:
                task.cancel()
        await self._stop_process(self._process)
        self._fail_all("the server is shutting down")
        self._push.close()
        self._pull.close()
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        """The executor's process id while one is alive."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    # ---- requests --------------------------------------------------------------------

    def submit(self, rid: str, prompt_token_ids: list[int], params,
               downstream: list[str] | None = None, num_resumed_tokens: int = 0) -> asyncio.Queue:
        """Send a request to the executor; its outputs arrive on the returned queue.

        `downstream`: activation endpoints of the later pipeline stages (none: whole model);
        `num_resumed_tokens`: how many of the last prompt ids were generated already (replay).
        """
        if self.state != "ready":
            raise NotReadyError(self.error or "the model is loading")
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already running")
        queue: asyncio.Queue = asyncio.Queue()
        self.requests[rid] = queue
        if not self._send(AddRequest(rid, prompt_token_ids, params, downstream or [],
                                     num_resumed_tokens)):
            del self.requests[rid]
            raise NotReadyError("the executor is not connected")
        return queue

    def set_link_aliases(self, aliases: dict[str, str]) -> None:
        """P2P mode: peers' endpoints that must go through local relays (kept across restarts)."""
        self.link_aliases = dict(aliases)
        if self.state == "ready":
            self._send(SetLinkAliases(self.link_aliases))

    def set_link_security(self, key: str, peers: list[str],
                          curve_keys: list[str] | None = None) -> None:
        """The pipeline's stage-link key (hex, "" for none), endpoints and their CURVE keys,
        from the scheduler's heartbeat answer; a fresh executor gets them before any request."""
        security = SetLinkSecurity(key, list(peers), list(curve_keys or ()))
        if security == self.link_security:
            return
        self.link_security = security
        if self.state == "ready":
            self._send(security)

    @property
    def link_key_id(self) -> str:
        """Fingerprint of the link key and CURVE keys the (next) executor holds, for
        heartbeats."""
        return link_fingerprint(parse_key(self.link_security.key),
                                self.link_security.curve_keys)

    def set_grammar_vocab(self, tokenizer_json: str) -> None:
        """The model's tokenizer for constrained decoding: sent now when an executor is ready,
        and to every executor that becomes ready later."""
        self.grammar_vocab = SetGrammarVocab(tokenizer_json)
        self._vocab_model = self.config.model if self.config is not None else None
        if self.state == "ready":
            self._send(self.grammar_vocab)

    def abort(self, rid: str) -> bool:
        """Forget a request and tell the executor to free it. Returns whether it was in flight."""
        queue = self.requests.pop(rid, None)
        if queue is None:
            return False
        self._send(AbortRequest([rid]))
        queue.put_nowait(TokenOutput(rid, finished=True, finish_reason="abort"))
        return True

    def _send(self, message) -> bool:
        try:
            self._push.send(encode(message), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            logger.warning("cannot send to the executor: %s", exc)
            return False

    # ---- executor -> frontend --------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            data = await self._pull.recv()
            try:
                message = decode_from_executor(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.error("undecodable message from the executor: %s", exc)
                continue
            try:
                self._dispatch(message)
            except Exception:  # never let one message stop the loop
                logger.exception("handling an executor message failed")

    def _dispatch(self, message) -> None:
        if isinstance(message, StepOutputs):
            self.stats = message.stats
            if self.on_step is not None:
                self.on_step(message)
            for output in message.outputs:
                queue = self.requests.get(output.rid)
                if queue is None:
                    continue  # aborted or failed meanwhile
                if output.finished:
                    del self.requests[output.rid]
                queue.put_nowait(output)
        elif isinstance(message, ExecutorProgress):
            self.download = message.download
            self.on_progress(message.message)
        elif isinstance(message, ExecutorReady):
            if self._process is None or message.pid != self._process.pid:
                return  # from an executor we already gave up on
            self.info = message
            self.stats = ExecutorStats(0, 0, message.num_total_blocks, message.num_total_blocks)
            self.state, self.error = "ready", None
            self._failed_starts = 0
            if self.link_aliases:  # a fresh executor learns the relays its peers need
                self._send(SetLinkAliases(self.link_aliases))
            if self.link_security.key:  # ...and its link key, before any request
                self._send(self.link_security)
            if self.grammar_vocab is not None:  # ...and the tokenizer grammars are built on
                self._send(self.grammar_vocab)
            self._ready_event.set()
        elif isinstance(message, ExecutorError):
            if self._process is not None and message.pid == self._process.pid:
                if message.traceback and not message.during_startup:
                    logger.error("executor %d crashed:\n%s", message.pid, message.traceback)
                self._on_executor_down(message.message, message.during_startup)

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            self._dead = [p for p in self._dead if p.poll() is None]  # reap zombies
            process = self._process
            if process is None or self.state in ("idle", "error", "stopped"):
                continue
            code = process.poll()
            if code is not None:
                self._on_executor_down(f"the executor process exited with code {code}",
                                       during_startup=self.state == "loading")

    def _add_totals(self) -> None:
        """Keep the token counters of the executor that is going away."""
        for name in TOTALS:
            self._base[name] += getattr(self.stats, name)
        self.stats = msgspec.structs.replace(self.stats, **dict.fromkeys(TOTALS, 0))

    def total(self, name: str) -> int:
        """One of TOTALS (an ExecutorStats counter) over every executor since the node
        started."""
        return self._base[name] + getattr(self.stats, name)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens the executors of this node prefilled since the node started."""
        return self.total("num_prefill_tokens")

    @property
    def num_decode_tokens(self) -> int:
        """Tokens the executors of this node ran in decode steps since the node started."""
        return self.total("num_decode_tokens")

    def _on_executor_down(self, reason: str, during_startup: bool) -> None:
        """Fail in-flight requests and restart (or give up when it cannot start)."""
        self._add_totals()
        process = self._process
        self._process = None
        if process is not None and process.poll() is None:
            process.kill()
            self._dead.append(process)
        first_start = self.num_restarts == 0 and not self._ready_event.is_set()
        if not first_start:  # a first start's failure is reported by whoever waits for it
            logger.error("executor down: %s", reason)
        self._fail_all(f"the executor failed: {reason}")
        self.info = None
        self.stats = ExecutorStats()
        if during_startup:
            self._failed_starts += 1
        if (first_start or self._failed_starts > self.max_restarts or self.state == "stopped"
                or self.shutting_down):
            if self.state != "stopped":
                self.state, self.error = "error", reason
            self._ready_event.set()
            return
        self.state, self.error = "loading", None
        self.num_restarts += 1
        delay = min(5.0, 0.5 * self._failed_starts)
        self._restart_task = asyncio.create_task(self._restart(delay), name="executor-restart")

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.state == "loading" and self._process is None:
            self.on_progress(f"restarting the executor (restart {self.num_restarts})")
            self._spawn()

    def _fail_all(self, message: str) -> None:
        requests, self.requests = self.requests, {}
        for queue in requests.values():
            queue.put_nowait(ExecutorLost(message))
