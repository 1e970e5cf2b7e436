"""Wire bytes do not change by accident: every message type, encoded as its wire encodes it,
matches the bytes recorded in tests/recordings/wire/, and those bytes decode back to the sample.

One deterministic sample per msgspec struct of parallax.protocol (every field away from its
default where practical), plus the frames of one activation message as PipelineLinks sends them
(header + raw tensor bytes). A struct added to the protocol without a sample here fails
`test_every_protocol_struct_has_a_recording`.

The recordings were generated from the code before issue 18's moves and renames. To record a new
message type: add its sample, run this file once with PARALLAX_RECORD_WIRE=1 (it writes only the
missing files), review the new file and commit it. A changed recording means a changed wire:
peers of different versions would no longer understand each other.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import msgspec
import pytest
import torch

from parallax import protocol
from parallax.engine.sampling_params import SamplingParams
from parallax.node.links import PipelineLinks
from parallax.protocol.common import PEER_LOST, DownloadProgress, TokenOutput, encode
from parallax.protocol.control import (
    Assignment,
    Heartbeat,
    HeartbeatResponse,
    JoinResponse,
    LinkReport,
    NodeJoin,
    NodeLeave,
    PeerEndpoint,
    ProbeTarget,
    RoutingEntry,
)
from parallax.protocol.ipc import (
    AbortRequest,
    AddRequest,
    ExecutorError,
    ExecutorProgress,
    ExecutorReady,
    ExecutorStats,
    LinkSample,
    SetGrammarVocab,
    SetLinkAliases,
    SetLinkSecurity,
    Shutdown,
    StepOutputs,
    decode_from_executor,
    decode_to_executor,
)
from parallax.protocol.links import (
    ActivationEntry,
    LinkAck,
    LinkActivations,
    LinkPrefixAnswer,
    LinkPrefixQuery,
    LinkRelease,
    LinkSeal,
    LinkTokens,
    decode_link,
    decode_seal,
)
from parallax.protocol.p2p import (
    BridgeBody,
    BridgeEnd,
    BridgeHead,
    BridgeRequest,
    RelayedMessage,
    SchedulerRecord,
    decode_bridge_frame,
    decode_bridge_request,
    decode_relayed,
    decode_scheduler_record,
)
from parallax.protocol.tensors import read_hidden

RECORDINGS = Path(__file__).parent / "recordings" / "wire"
RECORD = os.environ.get("PARALLAX_RECORD_WIRE") == "1"

PARAMS = SamplingParams(temperature=0.5, top_p=0.75, top_k=40, min_p=0.125, presence_penalty=0.25,
                        frequency_penalty=-0.5, seed=1234, max_tokens=77, stop_token_ids=(2, 9),
                        ignore_eos=True, logprobs=True, top_logprobs=3, priority=-2,
                        grammar='{"type": "object"}')
DOWNLOAD = DownloadProgress(done_bytes=1 << 20, total_bytes=3 << 20, bytes_per_s=524288.5,
                            eta_s=4.25)
STATS = ExecutorStats(num_running=3, num_waiting=4, num_free_blocks=120, num_total_blocks=256,
                      layer_latency_ms=1.5, num_prefill_tokens=900, num_decode_tokens=45,
                      step_ms=12.25, num_batched=7, num_prefix_hit_tokens=64,
                      num_prefix_recomputed_tokens=16, num_activation_bytes_sent=98304)
TOKEN = TokenOutput(rid="chatcmpl-1", token_id=42, finished=True, finish_reason="error",
                    error="peer gone", kind=PEER_LOST, peer="tcp://10.0.0.2:7001",
                    logprob=-0.25, top_logprobs=[(42, -0.25), (7, -1.5)],
                    trace=[1.0, 2.5, 3.75, 0.5])
LINK_SAMPLE = LinkSample(peer="tcp://10.0.0.2:7001", transfer_ms=0.75, num_bytes=4096)
ASSIGNMENT = Assignment(model="Qwen/Qwen3-0.6B", start_layer=4, end_layer=28, generation=9,
                        quantize="q4_k")
LINK_REPORT = LinkReport(node_id="node-b", rtt_ms=3.5, bandwidth_mbps=812.25)
PROBE = ProbeTarget(node_id="node-c", http_url="http://10.0.0.3:8000")
PEER = PeerEndpoint(activation_endpoint="tcp://10.0.0.4:7001", peer_id="12D3KooWpeer",
                    ready=True)
ENTRY = ActivationEntry(rid="chatcmpl-1", token_ids=[5, 6, 7], start_position=16,
                        sampling_params=PARAMS, num_prompt_tokens=19,
                        downstream=["tcp://10.0.0.3:7001"], head_endpoint="tcp://10.0.0.1:7001",
                        due=True, trace=[0.5, 1.25], reuses_prefix=True)

# (sample, how that wire encodes it, how the receiving code decodes it)
MSGPACK, JSON = "msgpack", "json"


def _msgpack_as(cls):
    return lambda data: msgspec.msgpack.decode(data, type=cls)


SAMPLES: list[tuple[msgspec.Struct, str, object]] = [
    # ---- ipc: frontend <-> executor
    (AddRequest(rid="chatcmpl-1", prompt_token_ids=[1, 2, 3], sampling_params=PARAMS,
                downstream=["tcp://10.0.0.2:7001"], num_resumed_tokens=1),
     MSGPACK, decode_to_executor),
    (AbortRequest(rids=["chatcmpl-1", "chatcmpl-2"]), MSGPACK, decode_to_executor),
    (Shutdown(), MSGPACK, decode_to_executor),
    (SetLinkAliases(aliases={"tcp://10.0.0.2:7001": "tcp://127.0.0.1:9100"}), MSGPACK,
     decode_to_executor),
    (SetLinkSecurity(key="ab" * 32, peers=["tcp://10.0.0.2:7001", "tcp://10.0.0.3:7001"],
                     curve_keys=["curvekey-b", ""]), MSGPACK, decode_to_executor),
    (SetGrammarVocab(tokenizer_json='{"model": {"type": "BPE"}}'), MSGPACK,
     decode_to_executor),
    (ExecutorProgress(message="loading weights", download=DOWNLOAD), MSGPACK,
     decode_from_executor),
    (ExecutorReady(pid=4321, model_name="Qwen3-0.6B", model_type="qwen3", start_layer=0,
                   end_layer=14, num_layers=28, max_model_len=4096, block_size=16,
                   num_total_blocks=512, eos_token_ids=[151645, 151643],
                   tokenizer_path="/models/qwen3", device="cpu", dtype="float32",
                   load_seconds=2.5, curve_public_key="curvekey-a",
                   kernels={"q4_1": "avx2", "q8_0": "torch"},
                   decode_step="one native call per step (native-avx2)"),
     MSGPACK, decode_from_executor),
    (StepOutputs(outputs=[TOKEN, TokenOutput(rid="chatcmpl-2", token_id=11)], stats=STATS,
                 links=[LINK_SAMPLE]), MSGPACK, decode_from_executor),
    (ExecutorError(pid=4321, message="out of memory", traceback="Traceback ...",
                   during_startup=True), MSGPACK, decode_from_executor),
    (DOWNLOAD, MSGPACK, _msgpack_as(DownloadProgress)),
    (STATS, MSGPACK, _msgpack_as(ExecutorStats)),
    (TOKEN, MSGPACK, _msgpack_as(TokenOutput)),
    (LINK_SAMPLE, MSGPACK, _msgpack_as(LinkSample)),
    (PARAMS, MSGPACK, _msgpack_as(SamplingParams)),
    # ---- control plane: node <-> scheduler, HTTP JSON bodies
    (ASSIGNMENT, JSON, None),
    (NodeJoin(node_id="node-a", device="cuda", device_name="NVIDIA H100", memory_bytes=8 << 30,
              gflops=1234.5, bandwidth_gbps=2000.25, http_url="http://10.0.0.1:8000",
              activation_endpoint="tcp://10.0.0.1:7001", max_running_requests=16,
              peer_id="12D3KooWnode"), JSON, None),
    (JoinResponse(node_id="node-a", heartbeat_interval_s=2.5, assignment=ASSIGNMENT,
                  node_secret="s3cret"), JSON, None),
    (Heartbeat(node_id="node-a", state="loading", running_requests=2, waiting_requests=1,
               free_blocks=100, total_blocks=512, layer_latency_ms=0.5,
               loaded_model="Qwen/Qwen3-0.6B", loaded_quantize="q8_0", loaded_start_layer=0,
               loaded_end_layer=14, error="none yet", link_key_id="kid-1",
               curve_public_key="curvekey-a", download=DOWNLOAD, scheduler_rtt_ms=1.75,
               links=[LINK_REPORT]), JSON, None),
    (LINK_REPORT, JSON, None),
    (PROBE, JSON, None),
    (PEER, JSON, None),
    (HeartbeatResponse(known=True, assignment=ASSIGNMENT, peers=[PEER], link_key="cd" * 32,
                       link_peers=["tcp://10.0.0.2:7001"], link_curve_keys=["curvekey-b"],
                       probe_peers=[PROBE]), JSON, None),
    (NodeLeave(node_id="node-a"), JSON, None),
    (RoutingEntry(node_id="node-a", http_url="http://10.0.0.1:8000",
                  activation_endpoint="tcp://10.0.0.1:7001", start_layer=0, end_layer=14),
     JSON, None),
    # ---- stage links: executor -> executor, ZeroMQ tcp multipart
    (LinkSeal(session=b"\x01" * 16, seq=99, mac=b"\x02" * 32), MSGPACK, decode_seal),
    (ENTRY, MSGPACK, _msgpack_as(ActivationEntry)),
    (LinkActivations(entries=[ENTRY, ActivationEntry(rid="chatcmpl-2", token_ids=[8],
                                                     start_position=3)],
                     dtype="bfloat16", hidden_size=4, send_id=17,
                     sender="tcp://10.0.0.1:7001"), MSGPACK, decode_link),
    (LinkTokens(outputs=[TOKEN], send_id=18, sender="tcp://10.0.0.3:7001"), MSGPACK,
     decode_link),
    (LinkRelease(rids=["chatcmpl-1", "chatcmpl-3"]), MSGPACK, decode_link),
    (LinkAck(send_id=17, held_ms=0.25), MSGPACK, decode_link),
    (LinkPrefixQuery(rid="chatcmpl-4", token_ids=list(range(32)),
                     downstream=["tcp://10.0.0.3:7001"], head_endpoint="tcp://10.0.0.1:7001"),
     MSGPACK, decode_link),
    (LinkPrefixAnswer(rid="chatcmpl-4", num_cached_tokens=16), MSGPACK, decode_link),
    # ---- P2P: HTTP over a Lattica stream, DHT records, relayed stage messages
    (BridgeRequest(method="POST", path="/node/heartbeat?x=1",
                   headers=[("content-type", "application/json"), ("x-join-token", "t")],
                   body=b'{"node_id": "node-a"}'), MSGPACK, decode_bridge_request),
    (BridgeHead(status=201, headers=[("content-type", "text/event-stream")]), MSGPACK,
     decode_bridge_frame),
    (BridgeBody(data=b"data: {}\n\n"), MSGPACK, decode_bridge_frame),
    (BridgeEnd(error="the local server failed"), MSGPACK, decode_bridge_frame),
    (SchedulerRecord(peer_id="12D3KooWsched", addresses=["/ip4/10.0.0.9/tcp/4001"],
                     model="Qwen/Qwen3-0.6B"), MSGPACK, decode_scheduler_record),
    (RelayedMessage(target_peer_id="12D3KooWpeer", frames=[b"seal", b"header", b"\x00\xff"]),
     MSGPACK, decode_relayed),
]


def _encode(sample: msgspec.Struct, codec: str) -> bytes:
    if codec == JSON:  # agent.py posts msgspec.json.encode(struct); app.py answers likewise
        return msgspec.json.encode(sample)
    return encode(sample)


def _decode(data: bytes, sample: msgspec.Struct, codec: str, decoder) -> msgspec.Struct:
    if codec == JSON:  # app.py / agent.py: msgspec.json.decode(body, type=...)
        return msgspec.json.decode(data, type=type(sample))
    return decoder(data)


def _recorded(name: str, lines: list[bytes]) -> list[bytes]:
    """The recorded frames of `name` (one hex line each); writes them when recording."""
    path = RECORDINGS / f"{name}.hex"
    if RECORD and not path.exists():
        RECORDINGS.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line.hex() + "\n" for line in lines))
    assert path.exists(), f"no recording {path}: see this module's docstring to record one"
    return [bytes.fromhex(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("sample", "codec", "decoder"), SAMPLES,
                         ids=[type(s).__name__ for s, _, _ in SAMPLES])
def test_message_bytes_match_the_recording(sample, codec, decoder):
    encoded = _encode(sample, codec)
    [recorded] = _recorded(type(sample).__name__, [encoded])
    assert encoded == recorded, f"{type(sample).__name__} encodes differently than recorded"
    decoded = _decode(recorded, sample, codec, decoder)
    assert type(decoded) is type(sample)
    assert decoded == sample


def test_routing_table_entry_as_forwarded_matches_the_struct_bytes():
    """forward.py sends RoutingEntry as msgspec.to_builtins inside the request body."""
    [sample] = [s for s, _, _ in SAMPLES if isinstance(s, RoutingEntry)]
    [recorded] = _recorded("RoutingEntry", [])
    assert msgspec.json.encode(msgspec.to_builtins(sample)) == recorded
    assert msgspec.convert(msgspec.json.decode(recorded), RoutingEntry) == sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_frames_match_the_recording(dtype):
    """Frames 1 and 2 of an activation message (header, raw hidden-state bytes) as
    PipelineLinks.send_activations builds them (frame 0, the seal, is added when sending)."""
    links = PipelineLinks.__new__(PipelineLinks)  # no sockets: capture what it would send
    links.own_endpoint, links.num_activation_bytes_sent, sent = "tcp://10.0.0.1:7001", 0, []
    links.send = lambda endpoint, frames: sent.append((endpoint, frames))
    hidden = (torch.arange(12, dtype=torch.float32).view(3, 4) / 4 - 1).to(dtype)
    entries = [ActivationEntry(rid="chatcmpl-1", token_ids=[5, 6], start_position=0,
                               sampling_params=PARAMS, num_prompt_tokens=2),
               ActivationEntry(rid="chatcmpl-2", token_ids=[9], start_position=7)]
    links.send_activations("tcp://10.0.0.2:7001", entries, hidden, send_id=5)
    [(endpoint, frames)] = sent
    frames = [bytes(frame) for frame in frames]
    recorded = _recorded(f"activation_frames_{str(dtype).removeprefix('torch.')}", frames)
    assert frames == recorded
    header = decode_link(recorded[0])
    assert header.entries == entries and header.hidden_size == 4 and header.send_id == 5
    assert header.dtype == str(dtype).removeprefix("torch.")
    assert torch.equal(read_hidden(bytearray(recorded[1]), header.dtype, header.hidden_size),
                       hidden)


def _protocol_structs() -> set[type]:
    """Every msgspec struct defined in parallax.protocol (the module, or the package's modules)."""
    modules = [protocol]
    if hasattr(protocol, "__path__"):
        modules += [importlib.import_module(f"{protocol.__name__}.{info.name}")
                    for info in pkgutil.iter_modules(protocol.__path__)]
    return {obj for module in modules for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, msgspec.Struct)
            and obj.__module__.startswith(protocol.__name__)}


def test_every_protocol_struct_has_a_recording():
    structs = _protocol_structs()
    assert len(structs) >= 30  # the walk found the protocol's structs at all
    sampled = {type(sample) for sample, _, _ in SAMPLES}
    missing = sorted(cls.__name__ for cls in structs - sampled)
    assert not missing, f"wire structs without a sample and recording here: {missing}"
    recorded = {path.stem for path in RECORDINGS.glob("*.hex")}
    assert {cls.__name__ for cls in sampled} <= recorded
