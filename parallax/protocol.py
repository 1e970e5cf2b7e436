"""Every message that crosses a process or host boundary, as typed msgspec structs.

Wire format: one msgpack-encoded struct per ZeroMQ message (a multipart message later, when
tensors travel: header frame + raw tensor byte frames). Structs are tagged (`"type"` field), so
one decoder per direction turns bytes back into the right struct. Nothing here is ever pickled.

Directions:

- frontend -> executor (`ipc://`, PUSH/PULL): `AddRequest`, `AbortRequest`, `Shutdown`.
- executor -> frontend (`ipc://`, PUSH/PULL): `ExecutorProgress`, `ExecutorReady`,
  `StepOutputs` (one per engine step: the batch of `TokenOutput`s and `ExecutorStats`),
  `ExecutorError` (the executor is going down; sent by its top-level handler).

Stage-to-stage messages (activations over `tcp://`) join this module when pipelines land.
"""

from __future__ import annotations

from typing import Union

import msgspec

from parallax.engine.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag="add", frozen=True):
    """Start generating for `rid` from `prompt_token_ids` (already templated and tokenized).

    `downstream`: activation endpoints of the pipeline's later stages, in order (empty when this
    node holds the whole model).
    """

    rid: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    downstream: list[str] = []
    # a replayed request (failover): the last `num_resumed_tokens` of `prompt_token_ids` are
    # ids the request already generated on a pipeline that broke; they are prefilled with the
    # prompt and count as generated (max_tokens, penalties)
    num_resumed_tokens: int = 0


class AbortRequest(msgspec.Struct, tag="abort", frozen=True):
    """Drop these requests and free their KV blocks (client gone, stop string hit, ...)."""

    rids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    """Finish the loop and exit cleanly."""


class DownloadProgress(msgspec.Struct, frozen=True):
    """Bytes of the node's shard fetched from the hub so far (a hub GGUF's tensor ranges)."""

    done_bytes: int
    total_bytes: int
    bytes_per_s: float
    eta_s: float


class ExecutorProgress(msgspec.Struct, tag="progress", frozen=True):
    """A start-up step ("loading ...", "warming up ...") for the operator's console."""

    message: str
    download: DownloadProgress | None = None  # while the shard's weights are downloading


class ExecutorReady(msgspec.Struct, tag="ready", frozen=True):
    """The model is loaded and warmed up; requests may be sent from now on."""

    pid: int
    model_name: str
    model_type: str
    start_layer: int
    end_layer: int
    num_layers: int
    max_model_len: int
    block_size: int
    num_total_blocks: int
    eos_token_ids: list[int]
    tokenizer_path: str
    device: str
    dtype: str
    load_seconds: float
    curve_public_key: str = ""  # its activation socket's CURVE key ("": not encrypted)
    # packed weight type -> kernel path ("q4_1": "avx2" / "torch" / "gather"), for /health
    kernels: dict[str, str] = {}


class ExecutorStats(msgspec.Struct, frozen=True, array_like=True):
    """The engine's load right after a step (or after handling control messages)."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    layer_latency_ms: float = 0.0  # step time per decoder layer of this shard (EWMA)
    # tokens this executor computed since it started: in prefill (prompt, and the generated
    # ids of replayed requests) and in decode steps (a head's own counters, for failover proof)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # the step just taken (node/tracing.py; Prometheus histograms of the node): its wall time
    # and the requests it ran
    step_ms: float = 0.0
    num_batched: int = 0
    # prefix caching (every stage): prompt tokens skipped thanks to its cache; on a head, the
    # tokens of its own cached prefixes it ran again because a later stage had lost them; and
    # the bytes of hidden states this stage sent to the next one
    num_prefix_hit_tokens: int = 0
    num_prefix_recomputed_tokens: int = 0
    num_activation_bytes_sent: int = 0


# Why a request failed (TokenOutput.kind), so that whoever drives it can decide to replay it:
# the pipeline broke (a peer was lost, or took nothing in time: replay elsewhere), the engine
# failed on it (replay, a bounded number of times), or the request itself is invalid (never).
PEER_LOST = "peer_lost"
STAGE_TIMEOUT = "stage_timeout"
INVALID_REQUEST = "invalid_request"
ENGINE_ERROR = "engine_error"
FAILURE_KINDS = (PEER_LOST, STAGE_TIMEOUT, INVALID_REQUEST, ENGINE_ERROR)


class TokenOutput(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """What one request produced in one step: a token, and/or the end of the request.

    `finish_reason` is one of stop | length | abort | error; `error` says what went wrong,
    `kind` (one of FAILURE_KINDS) why, and `peer` the activation endpoint that was lost or
    timed out, when one was. `logprob` and `top_logprobs` ((id, logprob) pairs, most likely
    first) come with the token when the request asked for logprobs (engine/sampler.py).
    """

    rid: str
    token_id: int | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    kind: str | None = None
    peer: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = []
    # the request's trace so far: one STAGE_RECORD_LEN-float record per stage, the head first
    # (parallax/node/tracing.py; every stage measures with its own clock only)
    trace: list[float] = []


class LinkSample(msgspec.Struct, frozen=True, array_like=True):
    """One measured stage-to-stage message: its round trip less the receiver's own time (ms)."""

    peer: str  # the receiver's activation endpoint
    transfer_ms: float
    num_bytes: int


class StepOutputs(msgspec.Struct, tag="outputs", frozen=True):
    """All outputs of one step (possibly none, to publish fresh stats after an abort)."""

    outputs: list[TokenOutput]
    stats: ExecutorStats
    links: list[LinkSample] = []  # link transfers measured since the last StepOutputs


class ExecutorError(msgspec.Struct, tag="error", frozen=True):
    """The executor failed as a whole (start-up or loop); it exits after sending this."""

    pid: int
    message: str
    traceback: str = ""
    during_startup: bool = False


class SetLinkAliases(msgspec.Struct, tag="aliases", frozen=True):
    """P2P mode: send what is addressed to a peer's activation endpoint (key) to a local relay
    endpoint (value) instead, because that peer cannot be reached over tcp from here."""

    aliases: dict[str, str]


class SetLinkSecurity(msgspec.Struct, tag="link_security", frozen=True):
    """The key that signs and checks this stage's activation links (hex, from the scheduler's
    heartbeat answer; "" = none: every stage message is dropped) and the activation endpoints
    of its pipeline, the only ones it may send to."""

    key: str
    peers: list[str]
    curve_keys: list[str] = []  # CURVE public key of each peer, in `peers` order ("": none)


class SetGrammarVocab(msgspec.Struct, tag="grammar_vocab", frozen=True):
    """The frontend's tokenizer as `tokenizer.json` text: the stage that samples builds its
    grammar matchers from it (parallax/engine/grammar.py); GGUF tokenizers included."""

    tokenizer_json: str


ToExecutor = Union[AddRequest, AbortRequest, Shutdown, SetLinkAliases,  # noqa: UP007
                   SetLinkSecurity, SetGrammarVocab]
FromExecutor = Union[ExecutorProgress, ExecutorReady, StepOutputs, ExecutorError]  # noqa: UP007

_encoder = msgspec.msgpack.Encoder()
_to_executor = msgspec.msgpack.Decoder(ToExecutor)
_from_executor = msgspec.msgpack.Decoder(FromExecutor)


def encode(message: msgspec.Struct) -> bytes:
    """msgpack bytes of any message in this module."""
    return _encoder.encode(message)


def decode_to_executor(
    data: bytes,
) -> AddRequest | AbortRequest | Shutdown | SetLinkAliases | SetLinkSecurity:
    """Decode a frontend -> executor message (raises msgspec.DecodeError / ValidationError)."""
    return _to_executor.decode(data)


def decode_from_executor(
    data: bytes,
) -> ExecutorProgress | ExecutorReady | StepOutputs | ExecutorError:
    """Decode an executor -> frontend message (raises msgspec.DecodeError / ValidationError)."""
    return _from_executor.decode(data)


# ---- cluster control plane (HTTP JSON bodies between nodes and the scheduler) -----------------
#
# POST /node/join      NodeJoin       -> JoinResponse
# POST /node/heartbeat Heartbeat      -> HeartbeatResponse
# POST /node/leave     NodeLeave      -> {"ok": true}
# Each carries the cluster's join token, when one is set, in the header `X-Join-Token`, and
# (after the join) the node's own secret from its JoinResponse in the header `X-Node-Secret`.


class Assignment(msgspec.Struct, frozen=True, omit_defaults=True):
    """The layers a node must hold: `model` is what it passes to load_shard."""

    model: str
    start_layer: int
    end_layer: int
    generation: int  # bumps with every allocation change
    quantize: str | None = None  # q8_0 | q4_0 | q4_k: pack the float weights at load (--quantize)


class NodeJoin(msgspec.Struct, frozen=True):
    node_id: str  # stable per machine + port: a restarted node replaces its old entry
    device: str  # cpu | cuda
    device_name: str
    memory_bytes: int  # budget for weights + KV cache
    gflops: float
    bandwidth_gbps: float
    http_url: str  # the node frontend, reachable by the scheduler
    activation_endpoint: str  # tcp://host:port of its executor, reachable by other nodes
    max_running_requests: int = 32
    peer_id: str | None = None  # P2P mode: the scheduler reaches this node over Lattica


class JoinResponse(msgspec.Struct, frozen=True):
    node_id: str
    heartbeat_interval_s: float
    assignment: Assignment | None = None  # None: wait (more nodes needed, or standby)
    # this node's own secret: its heartbeats and leave (and a re-join while its entry is
    # alive) send it as `X-Node-Secret`, so another token holder cannot speak for it
    node_secret: str = ""


class Heartbeat(msgspec.Struct, frozen=True):
    node_id: str
    state: str  # idle | loading | ready | error
    running_requests: int = 0
    waiting_requests: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    layer_latency_ms: float = 0.0  # measured per decoder layer (EWMA)
    loaded_model: str | None = None  # what the executor has loaded and serves
    loaded_quantize: str | None = None  # ... and the quantization it was loaded with
    loaded_start_layer: int | None = None
    loaded_end_layer: int | None = None
    error: str | None = None
    # fingerprint of the link key (and peers' CURVE keys) its executor holds
    # (link_crypto.link_fingerprint)
    link_key_id: str = ""
    curve_public_key: str = ""  # its executor's activation CURVE key (TLS nodes; "" none)
    download: DownloadProgress | None = None  # loading: its shard's download from the hub
    # network measurements (issue 16): its best recent heartbeat round trip, and what it
    # measured to the peers the scheduler listed (validated on receipt: finite, bounded count)
    scheduler_rtt_ms: float = 0.0
    links: list[LinkReport] = []


class LinkReport(msgspec.Struct, frozen=True, array_like=True):
    """What a node measured to one peer: RTT of its /health, bandwidth of its /node/probe."""

    node_id: str
    rtt_ms: float
    bandwidth_mbps: float = 0.0  # 0: not measured


class ProbeTarget(msgspec.Struct, frozen=True, array_like=True):
    """A peer the scheduler asks a node to measure (its HTTP frontend)."""

    node_id: str
    http_url: str


class PeerEndpoint(msgspec.Struct, frozen=True):
    """A P2P node's executor endpoint and the Lattica peer that can relay to it."""

    activation_endpoint: str
    peer_id: str
    ready: bool = False  # it has loaded its layers, so its executor listens


class HeartbeatResponse(msgspec.Struct, frozen=True):
    known: bool  # False: the scheduler forgot this node (evicted, restarted): join again
    assignment: Assignment | None = None
    peers: list[PeerEndpoint] = []  # P2P mode: the other P2P nodes, to probe for direct reach
    # its pipeline's stage-link key (hex; "" when it is in no pipeline of two or more stages)
    # and the activation endpoints of that pipeline, the only ones its executor sends to
    link_key: str = ""
    link_peers: list[str] = []
    link_curve_keys: list[str] = []  # CURVE public key of each link peer ("": plain link)
    probe_peers: list[ProbeTarget] = []  # peers to measure (network.MAX_PROBE_PEERS at most)


class NodeLeave(msgspec.Struct, frozen=True):
    node_id: str


class RoutingEntry(msgspec.Struct, frozen=True):
    """One stage of the pipeline chosen for a request, in order (the head first)."""

    node_id: str
    http_url: str
    activation_endpoint: str
    start_layer: int
    end_layer: int


# ---- data plane between executors (ZeroMQ tcp, PUSH -> PULL) -----------------------------------
#
# A message is a multipart ZeroMQ message: frame 0 is a StageSeal (msgpack), frame 1 one of
# the structs below (msgpack); StageActivations has a frame 2 with the raw bytes of the hidden
# states of all its entries, concatenated in entry order ([sum of num tokens, hidden_size] in
# `dtype`). The seal authenticates frames 1.. (parallax/node/link_auth.py). Nothing is pickled.


class StageSeal(msgspec.Struct, frozen=True, array_like=True):
    """HMAC-SHA256 under the pipeline's link key over `session`, `seq` and every later frame.

    `session`: random per sending PipelineLinks; `seq`: increases with every message it sends,
    so a receiver drops a replayed message (not newer than the last one of that session).
    """

    session: bytes
    seq: int
    mac: bytes


class ActivationEntry(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """Hidden states of tokens [start_position, start_position + len(token_ids)) of `rid`.

    A chunk with start_position 0 starts the request on the receiving stage (replacing any stale
    state of the same rid) and carries what that stage needs: sampling params, prompt length,
    the endpoints after it. Every chunk names the head's endpoint (where the last stage sends
    tokens, and where any stage reports a request it cannot continue).
    """

    rid: str
    token_ids: list[int]
    start_position: int
    sampling_params: SamplingParams | None = None
    num_prompt_tokens: int = 0
    downstream: list[str] = []
    head_endpoint: str = ""
    due: bool = False  # the last stage samples a token after this chunk
    trace: list[float] = []  # the request's trace records of the stages before (tracing.py)
    # a first chunk that starts at start_position > 0: the receiving stage reuses the
    # [0, start_position) of the prefix it reserved for the request (StagePrefixQuery)
    reuses_prefix: bool = False


class StageActivations(msgspec.Struct, tag="activations", frozen=True):
    entries: list[ActivationEntry]
    dtype: str  # torch dtype name of frame 1, e.g. "float32"
    hidden_size: int
    # > 0: answer with a StageAck to `sender` (the hop's transfer time, node/tracing.py)
    send_id: int = 0
    sender: str = ""


class StageTokens(msgspec.Struct, tag="tokens", frozen=True):
    """Last stage -> head: sampled tokens (or per-request errors) of one step."""

    outputs: list[TokenOutput]
    send_id: int = 0  # as in StageActivations
    sender: str = ""


class StageRelease(msgspec.Struct, tag="release", frozen=True):
    """Free these requests' KV on every later stage; travels the chain after the activations."""

    rids: list[str]


class StageAck(msgspec.Struct, tag="ack", frozen=True):
    """Receiver -> sender of a message with a `send_id`, at once: the sender's round trip less
    `held_ms` (the receiver's time between taking the message and acking) is the hop's
    transfer time, with no clock shared between the two (parallax/node/tracing.py)."""

    send_id: int
    held_ms: float


class StagePrefixQuery(msgspec.Struct, tag="prefix_query", frozen=True):
    """Head -> along the chain, before a request with a cached prefix runs: "how much of
    `token_ids` (full blocks) do you hold?". Each stage drops any stale state of `rid`, pins
    the longest prefix its own cache holds (at most what the stage before it holds) and
    passes the query on with `token_ids` cut to that; the last one (or the first that holds
    nothing) answers the head with StagePrefixAnswer. Like a first chunk, it carries the
    stages after the receiver and the head's endpoint."""

    rid: str
    token_ids: list[int]
    downstream: list[str] = []
    head_endpoint: str = ""


class StagePrefixAnswer(msgspec.Struct, tag="prefix_answer", frozen=True):
    """Later stage -> head: every later stage holds (and has pinned) the first
    `num_cached_tokens` of the request's prefix; the head starts the request there."""

    rid: str
    num_cached_tokens: int


StageMessage = Union[StageActivations, StageTokens, StageRelease,  # noqa: UP007
                     StageAck, StagePrefixQuery, StagePrefixAnswer]
_stage_decoder = msgspec.msgpack.Decoder(StageMessage)


_seal_decoder = msgspec.msgpack.Decoder(StageSeal)


def decode_stage(data: bytes) -> (StageActivations | StageTokens | StageRelease | StageAck
                                  | StagePrefixQuery | StagePrefixAnswer):
    """Decode the header frame (frame 1) of a stage-to-stage message."""
    return _stage_decoder.decode(data)


def decode_seal(data: bytes) -> StageSeal:
    """Decode frame 0 of a stage-to-stage message."""
    return _seal_decoder.decode(data)


# ---- P2P mode: HTTP over a Lattica stream (parallax/p2p/bridge.py) -----------------------------
#
# The caller sends one BridgeRequest (msgpack) to the peer's `HttpBridge.http` stream method; the
# peer answers with a stream of BridgeFrame: one BridgeHead, any number of BridgeBody, and one
# BridgeEnd. A stream that stops without BridgeEnd was cut (peer gone). Lattica pickles by
# default; these bytes are ours, so nothing is unpickled on either side.


class BridgeRequest(msgspec.Struct, frozen=True):
    method: str
    path: str  # path and query, e.g. /node/heartbeat
    headers: list[tuple[str, str]]
    body: bytes = b""


class BridgeHead(msgspec.Struct, tag="head", frozen=True):
    status: int
    headers: list[tuple[str, str]]


class BridgeBody(msgspec.Struct, tag="body", frozen=True):
    data: bytes


class BridgeEnd(msgspec.Struct, tag="end", frozen=True):
    error: str | None = None  # the local server failed mid-answer


BridgeFrame = Union[BridgeHead, BridgeBody, BridgeEnd]  # noqa: UP007
_bridge_request_decoder = msgspec.msgpack.Decoder(BridgeRequest)
_bridge_frame_decoder = msgspec.msgpack.Decoder(BridgeFrame)


def decode_bridge_request(data: bytes) -> BridgeRequest:
    return _bridge_request_decoder.decode(data)


def decode_bridge_frame(data: bytes) -> BridgeHead | BridgeBody | BridgeEnd:
    return _bridge_frame_decoder.decode(data)


class SchedulerRecord(msgspec.Struct, frozen=True):
    """What a P2P scheduler publishes in the DHT under `parallax/scheduler/<peer id>`."""

    peer_id: str
    addresses: list[str]  # multiaddrs it listens on
    model: str | None = None


class RelayedMessage(msgspec.Struct, frozen=True):
    """A stage message carried over Lattica (ActivationRelay in parallax/p2p/relay.py): the
    ZeroMQ frames as they were sent, for the executor of `target_peer_id`."""

    target_peer_id: str
    frames: list[bytes]


_relayed_decoder = msgspec.msgpack.Decoder(RelayedMessage)
_scheduler_record_decoder = msgspec.msgpack.Decoder(SchedulerRecord)


def decode_relayed(data: bytes) -> RelayedMessage:
    return _relayed_decoder.decode(data)


def decode_scheduler_record(data: bytes) -> SchedulerRecord:
    return _scheduler_record_decoder.decode(data)
