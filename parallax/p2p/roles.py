"""The Lattica side of each role: the scheduler's peer, a node's peer, a chat server's peer.

The scheduler serves its HTTP API to peers through an HttpBridge and publishes a
SchedulerRecord in the DHT; a node serves its frontend (chat forwarding) the same way and talks
to the scheduler through a LatticaTransport; a chat server only calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from parallax.net import lan_address
from parallax.p2p.peer import (
    PeerConfig,
    split_target,
    start_peer,
)
from parallax.protocol.common import encode
from parallax.protocol.p2p import SchedulerRecord, decode_scheduler_record

if TYPE_CHECKING:
    from parallax.config import JoinConfig, SchedulerConfig
    from parallax.p2p.bridge import LatticaTransport

logger = logging.getLogger("parallax.p2p")

DHT_PREFIX = "parallax/scheduler/"
RECORD_TTL_S = 600.0
PUBLISH_INTERVAL_S = 240.0


@dataclass
class P2PPeer:
    """A running peer and, when it serves, its bridge; close() stops both."""

    peer: Any  # lattica.Lattica
    bridge: Any = None  # HttpBridge
    relay: Any = None  # ActivationRelay

    @property
    def peer_id(self) -> str:
        return self.peer.peer_id()

    def close(self, timeout_s: float = 3.0) -> None:
        """Stop serving and close the peer; never blocks longer than `timeout_s` (Lattica's
        close and cancel calls were seen to block for good once a peer had gone)."""
        for part in (self.bridge, self.relay):
            if part is not None:
                part.close()

        def close_peer() -> None:
            with contextlib.suppress(RuntimeError):
                self.peer.close()

        closer = threading.Thread(target=close_peer, name="lattica-close", daemon=True)
        closer.start()
        closer.join(timeout_s)


def local_host(host: str) -> str:
    """How a server bound to `host` is reached from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def local_url(host: str, port: int) -> str:
    return f"http://{local_host(host)}:{port}"


def start_serving_peer(config: PeerConfig, http_url: str, paths: tuple[str, ...],
                       activation_endpoint: str | None = None,
                       scheduler_peer_id: str | None = None) -> P2PPeer:
    """A peer serving `paths` of `http_url`, and relaying activations (to the executor at
    `activation_endpoint` on a node; between nodes on the scheduler)."""
    from parallax.p2p.bridge import HttpBridge
    from parallax.p2p.relay import ActivationRelay

    peer = start_peer(config)
    return P2PPeer(peer, HttpBridge(peer, http_url, paths),
                   ActivationRelay(peer, activation_endpoint, scheduler_peer_id))


def start_scheduler_peer(config: SchedulerConfig) -> P2PPeer:
    """The scheduler's peer (P2P mode): serves its HTTP API to peers through a bridge."""
    from parallax.p2p.bridge import SCHEDULER_PATHS

    port = config.p2p_port
    return start_serving_peer(
        PeerConfig(port, f"scheduler-{port}", relays=config.relays,
                   advertise_host=lan_address()),
        local_url(config.host, config.port), SCHEDULER_PATHS)


def start_node_peer(config: JoinConfig, scheduler: str, port: int, advertise_host: str,
                    activation_port: int, say: Callable[[str], None]
                    ) -> tuple[P2PPeer, LatticaTransport]:
    """A node's peer (P2P mode), dialling the `scheduler` target: it serves the node's HTTP
    `port` to the scheduler and relays activations to its executor at `activation_port`.
    Returns it and the transport the node's agent reaches the scheduler's peer with; `say`
    tells the operator the peer ids."""
    from parallax.p2p.bridge import NODE_PATHS, LatticaTransport

    scheduler_peer_id, address = split_target(scheduler)
    p2p_port = config.p2p_port or port + 200
    peer_config = PeerConfig(p2p_port, f"node-{port}", bootstraps=(address,) if address else (),
                             relays=config.relays, advertise_host=advertise_host,
                             mdns=address is None and not config.relays)
    peer = start_serving_peer(peer_config, local_url(config.host, port), NODE_PATHS,
                              f"tcp://{local_host(config.host)}:{activation_port}",
                              scheduler_peer_id)
    say(f"P2P peer {peer.peer_id} on tcp port {p2p_port}; scheduler peer {scheduler_peer_id}")
    return peer, LatticaTransport(peer.peer, scheduler_peer_id)


def start_client_peer(port: int, scheduler: str, relays: tuple[str, ...]) -> tuple[P2PPeer, str]:
    """A peer that only calls the scheduler (parallax chat); returns it and the scheduler id."""
    scheduler_peer_id, address = split_target(scheduler)
    # port 0: a throwaway identity, so two chat servers on one machine never share a peer id
    key_root = Path(tempfile.mkdtemp(prefix="parallax-p2p-")) if port == 0 else None
    config = PeerConfig(port, f"client-{port}", bootstraps=(address,) if address else (),
                        relays=relays, mdns=address is None and not relays, key_root=key_root)
    return P2PPeer(start_peer(config)), scheduler_peer_id


def publish_scheduler(peer: P2PPeer, record: SchedulerRecord) -> None:
    """Store the record under parallax/scheduler/<peer id> (raw msgpack: never pickled)."""
    peer.peer._lattica_instance.store_with_subkey(  # Lattica.store() would pickle the value
        DHT_PREFIX + record.peer_id, encode(record), time.time() + RECORD_TTL_S, None)


def read_scheduler_record(peer: P2PPeer, scheduler_peer_id: str) -> SchedulerRecord | None:
    """The record a scheduler published, or None (absent, expired or not ours)."""
    found = peer.peer._lattica_instance.get_with_subkey(DHT_PREFIX + scheduler_peer_id)
    if not found or isinstance(found, dict):
        return None
    try:
        return decode_scheduler_record(bytes(found[0]))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


async def keep_published(peer: P2PPeer, record_of) -> None:
    """Republish the scheduler's record before it expires, until cancelled."""
    while True:
        try:
            await asyncio.to_thread(publish_scheduler, peer, record_of())
        except RuntimeError as exc:
            logger.warning("publishing the scheduler in the DHT failed: %s", exc)
        await asyncio.sleep(PUBLISH_INTERVAL_S)
