"""ZeroMQ tcp links between the executors of a pipeline.

Each executor binds one PULL socket (its activation endpoint) and connects one PUSH socket per
peer it sends to. A socket monitor on every PUSH reports a peer that went away (process killed,
host gone): the requests routed through it are failed at once instead of hanging.

The activation port can be reached by anyone, so nothing received is trusted: every message
must carry a valid seal under the pipeline's link key (link_auth.py) and pass `LinkLimits`
(a known float dtype, this model's hidden size, frame count, byte length, bounded entries and
tokens, sane positions, endpoints only from the scheduler's table); anything else is dropped
with a log line. Sending never blocks the engine loop: a message a peer does not take at once waits
in a bounded per-peer queue that the loop flushes (`flush`); a peer that takes nothing for
CONNECT_WAIT_S counts as down, like a dropped connection. Only endpoints the scheduler listed
for this node's pipeline are ever dialled.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import msgspec
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from parallax.engine.sampling_params import MAX_TOP_LOGPROBS
from parallax.node.link_auth import LinkSecurity, NoLinkKey
from parallax.node.link_crypto import CurveKeyPair, connect_curve, is_curve_key, serve_curve
from parallax.node.tracing import ack_problem, trace_problem
from parallax.protocol.common import FAILURE_KINDS, PEER_LOST, STAGE_TIMEOUT, TokenOutput, encode
from parallax.protocol.links import (
    ActivationEntry,
    LinkAck,
    LinkActivations,
    LinkMessage,
    LinkPrefixAnswer,
    LinkPrefixQuery,
    LinkRelease,
    LinkTokens,
    decode_link,
)
from parallax.protocol.tensors import WIRE_DTYPES, hidden_frame, read_hidden

logger = logging.getLogger("parallax.links")

CONNECT_WAIT_S = 3.0  # how long a peer may take no message before it counts as down
MAX_PENDING = 1000  # messages waiting for one peer before it counts as down
RCVHWM = 100  # messages queued per connected sender on the activation port
MAX_RECEIVE_PER_CALL = 256  # then the engine steps: a flood cannot starve it
MIN_MESSAGE_TOKENS = 4096  # accepted per message even where this node batches fewer
MAX_ENTRIES = 1024
MAX_IDS = 4096  # outputs of a LinkTokens, rids of a LinkRelease
MAX_RID_CHARS = 256
MAX_ERROR_CHARS = 4096
MAX_DOWNSTREAM = 64
HEADER_SLACK_BYTES = 1 << 20  # header frames (token ids, params) on top of the tensor bytes
FINISH_REASONS = (None, "stop", "length", "abort", "error")
MAX_DROP_LOGS_PER_S = 20


@dataclass(frozen=True)
class LinkLimits:
    """What a stage message may hold on this shard."""

    hidden_size: int
    max_tokens: int  # per message
    max_position: int  # max model length
    vocab_size: int

    @classmethod
    def of(cls, engine, max_num_batched_tokens: int | None = None) -> LinkLimits:
        """The limits of `engine`'s shard (its model config and max model length)."""
        config = engine.model.config
        tokens = max(MIN_MESSAGE_TOKENS, max_num_batched_tokens
                     or engine.config.max_num_batched_tokens)
        return cls(int(config.hidden_size), tokens,
                   int(engine.max_model_len), int(config.vocab_size))

    @property
    def max_message_bytes(self) -> int:
        """ZMQ_MAXMSGSIZE: the largest tensor frame (float32 rows) plus header slack."""
        return self.max_tokens * self.hidden_size * 4 + HEADER_SLACK_BYTES


class PeerUnreachable(Exception):
    def __init__(self, endpoint: str, reason: str = "") -> None:
        super().__init__(f"cannot reach the next stage at {endpoint}"
                         + (f": {reason}" if reason else ""))
        self.endpoint = endpoint


class PipelineLinks:
    """The activation endpoint of this executor and its outgoing links."""

    def __init__(self, context: zmq.Context, bind_address: str, own_endpoint: str,
                 limits: LinkLimits, security: LinkSecurity | None = None,
                 curve: CurveKeyPair | None = None) -> None:
        self.context = context
        self.own_endpoint = own_endpoint
        self.limits = limits
        self.security = security or LinkSecurity()  # no key: fail closed until one arrives
        # CURVE (link_crypto.py): this stage's key pair when it encrypts; peers' public keys
        self.curve = curve
        self.curve_keys: dict[str, str] = {}  # endpoint -> its CURVE public key (Z85)
        self._client_curve: CurveKeyPair | None = curve
        self.pull = context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, RCVHWM)
        self.pull.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
        if curve is not None:
            serve_curve(self.pull, curve)
        self.pull.bind(bind_address)
        self.pushes: dict[str, zmq.Socket] = {}
        self.monitors: dict[zmq.Socket, str] = {}
        self.pending: dict[str, deque[tuple[list, float]]] = {}  # endpoint -> (frames, deadline)
        self._unreachable: set[str] = set()
        # why each endpoint disconnected_peers() last reported went down (FAILURE_KINDS)
        self.down_kinds: dict[str, str] = {}
        self.aliases: dict[str, str] = {}  # endpoint -> local relay endpoint (P2P fallback)
        self._drop_window, self._drop_logged, self._drops_unlogged = 0.0, 0, 0
        self.num_activation_bytes_sent = 0  # hidden-state bytes handed to send_activations

    def close(self) -> None:
        for socket in [self.pull, *self.pushes.values(), *self.monitors]:
            socket.close(linger=0)

    def set_security(self, key: bytes | None, peers: list[str],
                     curve_keys: list[str] | None = None) -> None:
        """The scheduler's current link key, this pipeline's endpoints and their CURVE public
        keys ("" for a peer that does not encrypt); a link whose key changed reconnects."""
        self.security.update(key, peers)
        curve_keys = list(curve_keys or ())
        keys = {endpoint: curve for endpoint, curve in zip(peers, curve_keys, strict=False)
                if is_curve_key(curve)}
        for endpoint in keys.keys() | self.curve_keys.keys():
            if keys.get(endpoint) != self.curve_keys.get(endpoint):
                self._drop(endpoint)  # reconnects with the new key when next used
        self.curve_keys = keys

    def allows(self, endpoint: str) -> bool:
        """Whether this stage may send to (or report to) `endpoint`."""
        return endpoint == self.own_endpoint or self.security.allows(endpoint)

    # ---- outgoing ----------------------------------------------------------------------

    def _push(self, endpoint: str) -> zmq.Socket:
        socket = self.pushes.get(endpoint)
        if socket is None:
            socket = self.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not connected
            socket.setsockopt(zmq.SNDHWM, 10_000)
            socket.setsockopt(zmq.RECONNECT_IVL, 200)
            socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
            monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            try:
                if endpoint in self.curve_keys and endpoint not in self.aliases:
                    if self._client_curve is None:  # this stage does not serve CURVE itself
                        self._client_curve = CurveKeyPair.generate()
                    connect_curve(socket, self.curve_keys[endpoint], self._client_curve)
                socket.connect(self.aliases.get(endpoint, endpoint))
            except zmq.ZMQError as exc:
                monitor.close(linger=0)
                socket.close(linger=0)
                raise PeerUnreachable(endpoint, str(exc)) from None
            self.pushes[endpoint] = socket
            self.monitors[monitor] = endpoint
        return socket

    def set_aliases(self, aliases: dict[str, str]) -> None:
        """Route these endpoints through local relays from now on (reconnecting if needed)."""
        for endpoint in aliases.keys() | self.aliases.keys():
            if aliases.get(endpoint) != self.aliases.get(endpoint):
                self._drop(endpoint)  # reconnects to the new target when next used
        self.aliases = dict(aliases)

    def send(self, endpoint: str, frames: list) -> None:
        """Seal and send a multipart message without blocking: a peer that is not ready for it
        gets it from `flush` later. PeerUnreachable when `endpoint` is not in the scheduler's
        table, there is no link key, or the peer is far behind."""
        if not self.security.allows(endpoint):  # never dial what the scheduler did not list
            raise PeerUnreachable(endpoint, "not an endpoint of this node's pipeline")
        try:
            message = [self.security.seal(frames), *frames]
        except NoLinkKey as exc:
            raise PeerUnreachable(endpoint, str(exc)) from None
        queue = self.pending.get(endpoint)
        if queue is not None:  # keep the order: behind what already waits
            if len(queue) >= MAX_PENDING:
                self._expire(endpoint, f"{MAX_PENDING} messages wait for it")
                raise PeerUnreachable(endpoint, "it takes no messages")
            queue.append((message, time.monotonic() + CONNECT_WAIT_S))
            return
        socket = self._push(endpoint)
        try:
            socket.send_multipart(message, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.pending[endpoint] = deque([(message, time.monotonic() + CONNECT_WAIT_S)])
        except zmq.ZMQError as exc:
            self._drop(endpoint)
            raise PeerUnreachable(endpoint, str(exc)) from None

    @property
    def has_pending(self) -> bool:
        return bool(self.pending)

    def flush(self) -> None:
        """Hand waiting messages to peers that take them now; a peer that took nothing for
        CONNECT_WAIT_S counts as down (reported by `disconnected_peers`). Never blocks."""
        now = time.monotonic()
        for endpoint, queue in list(self.pending.items()):
            socket = self.pushes.get(endpoint)
            while queue and socket is not None:
                message, deadline = queue[0]
                try:
                    socket.send_multipart(message, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    if now >= deadline:
                        self._expire(endpoint, f"it took no message for {CONNECT_WAIT_S:.0f} s")
                    break
                except zmq.ZMQError as exc:
                    self._expire(endpoint, str(exc))
                    break
                queue.popleft()
            if not queue or socket is None:
                self.pending.pop(endpoint, None)

    def _expire(self, endpoint: str, reason: str) -> None:
        logger.warning("the peer %s counts as down: %s", endpoint, reason)
        self._unreachable.add(endpoint)
        self._drop(endpoint)

    def _drop(self, endpoint: str) -> None:
        self.pending.pop(endpoint, None)
        socket = self.pushes.pop(endpoint, None)
        if socket is None:
            return
        for monitor, monitored in list(self.monitors.items()):
            if monitored == endpoint:
                del self.monitors[monitor]
                monitor.close(linger=0)
        socket.close(linger=0)

    def send_activations(self, endpoint: str, entries: list[ActivationEntry],
                         hidden: torch.Tensor, send_id: int = 0) -> None:
        """hidden: [sum of entries' tokens, hidden_size], rows in entry order. `send_id` > 0
        asks the receiver for a LinkAck (node/tracing.py)."""
        dtype, payload = hidden_frame(hidden)
        header = LinkActivations(entries, dtype, hidden.shape[-1], send_id,
                                 self.own_endpoint if send_id else "")
        self.send(endpoint, [encode(header), payload])
        self.num_activation_bytes_sent += payload.nbytes

    def send_message(self, endpoint: str, message: msgspec.Struct) -> None:
        self.send(endpoint, [encode(message)])

    def disconnected_peers(self) -> list[str]:
        """Endpoints whose connection dropped, or that took no message in time, since the last
        call (non-blocking)."""
        gone, self._unreachable = set(self._unreachable), set()
        self.down_kinds = {endpoint: STAGE_TIMEOUT for endpoint in gone}
        for monitor, endpoint in list(self.monitors.items()):
            while monitor.poll(0):
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    gone.add(endpoint)
                    self.down_kinds[endpoint] = PEER_LOST
        for endpoint in gone:
            self._drop(endpoint)  # reconnect lazily, with a fresh monitor, if used again
        return sorted(gone)

    # ---- incoming ----------------------------------------------------------------------

    def receive(self) -> tuple[LinkMessage, torch.Tensor | None] | None:
        """One valid message if available (non-blocking): (header, hidden [T, H] or None).

        Invalid messages are dropped with a log line; None when nothing valid is waiting (or
        after MAX_RECEIVE_PER_CALL invalid ones, so the engine can step).
        """
        for _ in range(MAX_RECEIVE_PER_CALL):
            try:
                frames = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            try:
                accepted = self._accept(frames)
            except Exception as exc:  # noqa: BLE001 - a bad message must never escape
                accepted = f"unexpected {type(exc).__name__}: {exc}"
            if not isinstance(accepted, str):
                return accepted
            self._log_drop(accepted, sum(len(f.buffer) for f in frames))
        return None

    def _accept(self, frames: list) -> tuple | str:
        """(header, hidden or None) for a valid message, else why it is dropped."""
        if len(frames) not in (2, 3):
            return f"{len(frames)} frames"
        problem = self.security.check([f.buffer for f in frames])
        if problem is not None:
            return problem
        try:
            message = decode_link(frames[1].bytes)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return f"undecodable header: {exc}"
        tensor = isinstance(message, LinkActivations)
        if len(frames) != (3 if tensor else 2):
            return f"{len(frames)} frames for a {type(message).__name__}"
        if isinstance(message, (LinkPrefixQuery, LinkPrefixAnswer)):
            return prefix_problem(message, self.limits, self.allows) or (message, None)
        if not tensor:
            return link_problem(message, self.limits) or (message, None)
        problem = activations_problem(message, len(frames[2].buffer), self.limits, self.allows)
        if problem is not None:
            return problem
        return message, read_hidden(frames[2].buffer, message.dtype, self.limits.hidden_size)

    def _log_drop(self, reason: str, num_bytes: int) -> None:
        """A log line per dropped message, at most MAX_DROP_LOGS_PER_S (a flood of garbage
        must not flood the log too); the next line counts the ones left out."""
        now = time.monotonic()
        if now - self._drop_window >= 1.0:
            self._drop_window, self._drop_logged = now, 0
        if self._drop_logged >= MAX_DROP_LOGS_PER_S:
            self._drops_unlogged += 1
            return
        self._drop_logged += 1
        more = f" ({self._drops_unlogged} more dropped unlogged)" if self._drops_unlogged else ""
        self._drops_unlogged = 0
        logger.warning("dropped a stage message of %d bytes: %s%s", num_bytes, reason[:300], more)


def _rid_problem(rid: str) -> str | None:
    return None if 0 < len(rid) <= MAX_RID_CHARS else f"request id of {len(rid)} characters"


def link_problem(message: LinkTokens | LinkRelease, limits: LinkLimits) -> str | None:
    """Why a LinkTokens / LinkRelease / LinkAck must be dropped, or None."""
    if isinstance(message, LinkAck):
        return ack_problem(message)
    if isinstance(message, LinkRelease):
        if not 0 < len(message.rids) <= MAX_IDS:
            return f"release of {len(message.rids)} requests"
        return next(filter(None, map(_rid_problem, message.rids)), None)
    if not 0 < len(message.outputs) <= MAX_IDS:
        return f"{len(message.outputs)} token outputs"
    for output in message.outputs:
        if (problem := _rid_problem(output.rid)) is not None:
            return problem
        if output.token_id is not None and not 0 <= output.token_id < limits.vocab_size:
            return f"token id {output.token_id} outside the vocabulary"
        if output.finish_reason not in FINISH_REASONS:
            return f"finish reason {output.finish_reason!r}"
        if output.error is not None and len(output.error) > MAX_ERROR_CHARS:
            return f"error text of {len(output.error)} characters"
        if output.kind is not None and output.kind not in FAILURE_KINDS:
            return f"failure kind {output.kind[:40]!r}"
        if output.peer is not None and len(output.peer) > MAX_RID_CHARS:
            return f"peer endpoint of {len(output.peer)} characters"
        if (problem := _logprobs_problem(output, limits)) is not None:
            return problem
        if output.trace and (problem := trace_problem(output.trace)) is not None:
            return problem
    return None


def prefix_problem(message: LinkPrefixQuery | LinkPrefixAnswer, limits: LinkLimits,
                   allows) -> str | None:
    """Why a prefix query / answer must be dropped, or None (`allows` as in
    activations_problem)."""
    if (problem := _rid_problem(message.rid)) is not None:
        return problem
    if isinstance(message, LinkPrefixAnswer):
        if not 0 <= message.num_cached_tokens <= limits.max_position:
            return f"{message.rid}: {message.num_cached_tokens} cached tokens"
        return None
    if not 0 < len(message.token_ids) <= limits.max_position:
        return f"{message.rid}: prefix of {len(message.token_ids)} tokens"
    if not all(0 <= t < limits.vocab_size for t in message.token_ids):
        return f"{message.rid}: token id outside the vocabulary"
    if len(message.downstream) > MAX_DOWNSTREAM:
        return f"{message.rid}: {len(message.downstream)} downstream stages"
    for endpoint in (message.head_endpoint, *message.downstream):
        if not allows(endpoint):
            return f"{message.rid}: endpoint {endpoint[:80]!r} is not in this pipeline"
    return None


def _logprobs_problem(output: TokenOutput, limits: LinkLimits) -> str | None:
    """A token's logprobs must be finite and <= 0, at most MAX_TOP_LOGPROBS alternatives, ids in
    the vocabulary, and come with a token."""
    if output.logprob is None and not output.top_logprobs:
        return None
    if output.token_id is None:
        return "logprobs without a token"
    if output.logprob is None or not _is_logprob(output.logprob):
        return f"logprob {output.logprob!r}"
    if len(output.top_logprobs) > MAX_TOP_LOGPROBS:
        return f"{len(output.top_logprobs)} top logprobs (at most {MAX_TOP_LOGPROBS})"
    for token_id, logprob in output.top_logprobs:
        if not 0 <= token_id < limits.vocab_size:
            return f"top logprob token id {token_id} outside the vocabulary"
        if not _is_logprob(logprob):
            return f"top logprob {logprob!r}"
    return None


def _is_logprob(value: float) -> bool:
    return math.isfinite(value) and value <= 1e-3  # log-softmax rounding may pass 0 a little


def activations_problem(message: LinkActivations, num_bytes: int, limits: LinkLimits,
                        allows) -> str | None:
    """Why a LinkActivations with a tensor frame of `num_bytes` must be dropped, or None.

    `allows(endpoint)`: whether the scheduler's table lists an endpoint it names.
    """
    dtype = WIRE_DTYPES.get(message.dtype)
    if dtype is None:
        return f"dtype {message.dtype[:40]!r} (not one of {', '.join(WIRE_DTYPES)})"
    if message.hidden_size != limits.hidden_size:
        return f"hidden size {message.hidden_size}, this model's is {limits.hidden_size}"
    if not 0 < len(message.entries) <= MAX_ENTRIES:
        return f"{len(message.entries)} entries"
    total = 0
    for entry in message.entries:
        if (problem := _entry_problem(entry, limits, allows)) is not None:
            return problem
        total += len(entry.token_ids)
    if total > limits.max_tokens:
        return f"{total} tokens in one message (at most {limits.max_tokens})"
    itemsize = dtype.itemsize
    if num_bytes != total * limits.hidden_size * itemsize:
        return (f"{num_bytes} tensor bytes for {total} tokens x {limits.hidden_size} x "
                f"{itemsize} bytes")
    return None


def _entry_problem(entry: ActivationEntry, limits: LinkLimits, allows) -> str | None:
    if (problem := _rid_problem(entry.rid)) is not None:
        return problem
    count = len(entry.token_ids)
    if not 0 < count <= limits.max_tokens:
        return f"{entry.rid}: {count} tokens"
    if not 0 <= entry.start_position <= limits.max_position - count:
        return f"{entry.rid}: tokens [{entry.start_position}, +{count}) outside the model"
    if not 0 <= entry.num_prompt_tokens <= limits.max_position:
        return f"{entry.rid}: prompt of {entry.num_prompt_tokens} tokens"
    if not all(0 <= t < limits.vocab_size for t in entry.token_ids):
        return f"{entry.rid}: token id outside the vocabulary"
    if len(entry.downstream) > MAX_DOWNSTREAM:
        return f"{entry.rid}: {len(entry.downstream)} downstream stages"
    if entry.trace and (problem := trace_problem(entry.trace)) is not None:
        return f"{entry.rid}: {problem}"
    for endpoint in (entry.head_endpoint, *entry.downstream):
        if not allows(endpoint):
            return f"{entry.rid}: endpoint {endpoint[:80]!r} is not in this pipeline"
    if entry.sampling_params is not None:
        try:
            entry.sampling_params.validate()
        except (ValueError, TypeError) as exc:
            return f"{entry.rid}: {exc}"
    return None


def wall_ms() -> float:
    return time.perf_counter() * 1000
