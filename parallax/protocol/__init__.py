"""Every message that crosses a process or host boundary, as typed msgspec structs, one module
per wire. Nothing here is ever pickled; every decoder checks types as it decodes.

    ipc.py      node HTTP server <-> its executor   ZeroMQ ipc://, msgpack
    control.py  node <-> cluster scheduler          HTTP JSON bodies
    links.py    executor -> executor (stage links)  ZeroMQ tcp://, msgpack + raw tensor bytes
    p2p.py      P2P mode over Lattica               stream frames, DHT records, relays
    common.py   what several wires carry (TokenOutput, DownloadProgress), `encode`
    tensors.py  the raw hidden-state frame of the stage links (needs torch: not re-exported)

Import a name from the module that owns it; this package re-exports them all for callers
outside the project.
"""

from parallax.protocol.common import (
    ENGINE_ERROR,
    FAILURE_KINDS,
    INVALID_REQUEST,
    PEER_LOST,
    STAGE_TIMEOUT,
    DownloadProgress,
    TokenOutput,
    encode,
)
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
    FromExecutor,
    LinkSample,
    SetGrammarVocab,
    SetLinkAliases,
    SetLinkSecurity,
    Shutdown,
    StepOutputs,
    ToExecutor,
    decode_from_executor,
    decode_to_executor,
)
from parallax.protocol.links import (
    ActivationEntry,
    LinkAck,
    LinkActivations,
    LinkMessage,
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
    BridgeFrame,
    BridgeHead,
    BridgeRequest,
    RelayedMessage,
    SchedulerRecord,
    decode_bridge_frame,
    decode_bridge_request,
    decode_relayed,
    decode_scheduler_record,
)

__all__ = [
    "AbortRequest",
    "ActivationEntry",
    "AddRequest",
    "Assignment",
    "BridgeBody",
    "BridgeEnd",
    "BridgeFrame",
    "BridgeHead",
    "BridgeRequest",
    "DownloadProgress",
    "ENGINE_ERROR",
    "ExecutorError",
    "ExecutorProgress",
    "ExecutorReady",
    "ExecutorStats",
    "FAILURE_KINDS",
    "FromExecutor",
    "Heartbeat",
    "HeartbeatResponse",
    "INVALID_REQUEST",
    "JoinResponse",
    "LinkReport",
    "LinkSample",
    "NodeJoin",
    "NodeLeave",
    "PEER_LOST",
    "PeerEndpoint",
    "ProbeTarget",
    "RelayedMessage",
    "RoutingEntry",
    "STAGE_TIMEOUT",
    "SchedulerRecord",
    "SetGrammarVocab",
    "SetLinkAliases",
    "SetLinkSecurity",
    "Shutdown",
    "LinkAck",
    "LinkActivations",
    "LinkMessage",
    "LinkPrefixAnswer",
    "LinkPrefixQuery",
    "LinkRelease",
    "LinkSeal",
    "LinkTokens",
    "StepOutputs",
    "ToExecutor",
    "TokenOutput",
    "decode_bridge_frame",
    "decode_bridge_request",
    "decode_from_executor",
    "decode_relayed",
    "decode_scheduler_record",
    "decode_seal",
    "decode_link",
    "decode_to_executor",
    "encode",
]
