"""Node HTTP server <-> its executor: one msgpack struct per ZeroMQ `ipc://` message (PUSH/PULL).

    node HTTP server (node/http_server.py)                executor (model shard, batch loop)
    ExecutorClient (node/executor_client.py)              ExecutorLoop (node/executor.py)
         |  AddRequest, AbortRequest, Shutdown,                  |
         |  SetLinkAliases, SetLinkSecurity, SetGrammarVocab     |
         |------------------- PUSH ipc:// -------------------->  |
         |                                                       |
         |  ExecutorProgress (start-up steps), ExecutorReady,    |
         |  StepOutputs (one per engine step: TokenOutput of     |
         |  each request, ExecutorStats, LinkSample of each      |
         |  measured stage link), ExecutorError (going down)     |
         |<------------------- PUSH ipc:// --------------------  |

Structs are tagged (`"type"` field), so one decoder per direction turns bytes back into the
right struct (`decode_to_executor`, `decode_from_executor`; `common.encode` both ways).
"""

from __future__ import annotations

from typing import Union

import msgspec

from parallax.engine.sampling_params import SamplingParams
from parallax.protocol.common import DownloadProgress, TokenOutput


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
    # how pure decode steps run: one native call, or the torch modules and why (for /health)
    decode_step: str = ""


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
    """The node HTTP server's tokenizer as `tokenizer.json` text: the stage that samples builds
    its grammar matchers from it (parallax/engine/grammar.py); GGUF tokenizers included."""

    tokenizer_json: str


ToExecutor = Union[AddRequest, AbortRequest, Shutdown, SetLinkAliases,  # noqa: UP007
                   SetLinkSecurity, SetGrammarVocab]
FromExecutor = Union[ExecutorProgress, ExecutorReady, StepOutputs, ExecutorError]  # noqa: UP007

_to_executor = msgspec.msgpack.Decoder(ToExecutor)
_from_executor = msgspec.msgpack.Decoder(FromExecutor)


def decode_to_executor(
    data: bytes,
) -> (AddRequest | AbortRequest | Shutdown | SetLinkAliases | SetLinkSecurity
      | SetGrammarVocab):
    """Decode an HTTP server -> executor message (raises msgspec.DecodeError / ValidationError)."""
    return _to_executor.decode(data)


def decode_from_executor(
    data: bytes,
) -> ExecutorProgress | ExecutorReady | StepOutputs | ExecutorError:
    """Decode an executor -> HTTP server message (raises msgspec.DecodeError / ValidationError)."""
    return _from_executor.decode(data)
