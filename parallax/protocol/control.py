"""Node <-> cluster scheduler control plane: HTTP JSON bodies (msgspec.json), node -> scheduler.

    node agent (node/agent.py)                        cluster scheduler (scheduler/app.py)
         |  POST /node/join       NodeJoin                     |
         |---------------------------------------------------->|
         |<------------------------------------ JoinResponse --|  (Assignment, node secret)
         |  POST /node/heartbeat  Heartbeat (load, LinkReport) |
         |---------------------------------------------------->|
         |<------------------------------- HeartbeatResponse --|  (Assignment, link key and
         |  POST /node/leave      NodeLeave                    |   peers, PeerEndpoint,
         |---------------------------------------------------->|   ProbeTarget)
         |<------------------------------------ {"ok": true} --|

    scheduler (scheduler/forward.py) --POST chat body + "routing_table": [RoutingEntry, ...]-->
    head node's HTTP server (the pipeline chosen for the request, head first)

Each call carries the cluster's join token, when one is set, in the header `X-Join-Token`, and
(after the join) the node's own secret from its JoinResponse in the header `X-Node-Secret`.
Assignments ride heartbeat answers only: the scheduler never calls a node's control plane.
"""

from __future__ import annotations

import msgspec

from parallax.protocol.common import DownloadProgress


class Assignment(msgspec.Struct, frozen=True, omit_defaults=True):
    """The layers a node must hold: `model` is what it passes to load_shard."""

    model: str
    start_layer: int
    end_layer: int
    generation: int  # bumps with every allocation change
    quantize: str | None = None  # q8_0 | q4_0 | q4_k: pack the float weights at load (--quantize)


class NodeJoin(msgspec.Struct, frozen=True):
    """POST /node/join: what a node offers (device, memory, measured speed, endpoints)."""

    node_id: str  # stable per machine + port: a restarted node replaces its old entry
    device: str  # cpu | cuda
    device_name: str
    memory_bytes: int  # budget for weights + KV cache
    gflops: float
    bandwidth_gbps: float
    http_url: str  # the node HTTP server, reachable by the scheduler
    activation_endpoint: str  # tcp://host:port of its executor, reachable by other nodes
    max_running_requests: int = 32
    peer_id: str | None = None  # P2P mode: the scheduler reaches this node over Lattica


class JoinResponse(msgspec.Struct, frozen=True):
    """The answer to a NodeJoin: its id, heartbeat period, assignment and secret."""

    node_id: str
    heartbeat_interval_s: float
    assignment: Assignment | None = None  # None: wait (more nodes needed, or standby)
    # this node's own secret: its heartbeats and leave (and a re-join while its entry is
    # alive) send it as `X-Node-Secret`, so another token holder cannot speak for it
    node_secret: str = ""


class Heartbeat(msgspec.Struct, frozen=True):
    """POST /node/heartbeat: the node's state, load and measurements."""

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
    """A peer the scheduler asks a node to measure (its HTTP server)."""

    node_id: str
    http_url: str


class PeerEndpoint(msgspec.Struct, frozen=True):
    """A P2P node's executor endpoint and the Lattica peer that can relay to it."""

    activation_endpoint: str
    peer_id: str
    ready: bool = False  # it has loaded its layers, so its executor listens


class HeartbeatResponse(msgspec.Struct, frozen=True):
    """The answer to a Heartbeat: the assignment, link key and peers, peers to probe."""

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
    """POST /node/leave: the node is going away; the scheduler forgets it and reallocates."""

    node_id: str


class RoutingEntry(msgspec.Struct, frozen=True):
    """One stage of the pipeline chosen for a request, in order (the head first)."""

    node_id: str
    http_url: str
    activation_endpoint: str
    start_layer: int
    end_layer: int
