"""Build the Lattica peer of a scheduler or node, and parse what users pass as `-s`."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("parallax.p2p")

BOOTSTRAP_WAIT_S = 5.0
PEER_HEADER = "x-parallax-peer"  # names the peer an HTTP request goes to (p2p/bridge.py)

# libp2p peer ids: base58btc multihash (Ed25519 keys give 12D3KooW..., RSA keys Qm...)
_PEER_ID = r"(?:12D3KooW|Qm)[1-9A-HJ-NP-Za-km-z]{38,60}"
PEER_ID_RE = re.compile(rf"^{_PEER_ID}$")
MULTIADDR_RE = re.compile(rf"^(/[\w.\-:]+)+/p2p/({_PEER_ID})$")


def default_key_root() -> Path:
    """Where peers keep their keys: $PARALLAX_P2P_HOME, else ~/.cache/parallax/p2p."""
    return Path(os.environ.get("PARALLAX_P2P_HOME", Path.home() / ".cache" / "parallax" / "p2p"))


def is_p2p_target(target: str | None) -> bool:
    """True for a bare peer id or a multiaddr ending in /p2p/<peer id>."""
    return bool(target) and bool(PEER_ID_RE.match(target) or MULTIADDR_RE.match(target))


def split_target(target: str) -> tuple[str, str | None]:
    """`<peer id>` or `/ip4/.../p2p/<peer id>` -> (peer id, multiaddr to dial or None)."""
    if PEER_ID_RE.match(target):
        return target, None
    match = MULTIADDR_RE.match(target)
    if match is None:
        raise ValueError(f"{target!r} is neither a peer id (12D3KooW...) nor a multiaddr "
                         "ending in /p2p/<peer id>")
    return match.group(2), target


@dataclass(frozen=True)
class PeerConfig:
    """One Lattica peer: where it listens, who it dials first, where its key lives."""

    listen_port: int
    key_name: str  # the key lives in <key_root>/<key_name>: a stable peer id per role
    bootstraps: tuple[str, ...] = ()  # multiaddrs dialled at start (the scheduler, relays)
    relays: tuple[str, ...] = ()  # relay servers for peers behind NAT
    advertise_host: str | None = None  # the address other machines dial (fixed port)
    mdns: bool = False  # find peers on the local network (a bare peer id with no bootstrap)
    key_root: Path | None = None  # None: default_key_root()


def start_peer(config: PeerConfig):
    """A running Lattica peer (lattica.Lattica) with the pickle hole closed in this process."""
    from parallax.p2p import safety

    os.environ.setdefault("RUST_LOG", "error")  # Lattica logs every retried call with a backtrace
    safety.install()
    from lattica import Lattica

    key_dir = Path(config.key_root or default_key_root()) / config.key_name
    key_dir.mkdir(parents=True, exist_ok=True)
    key_dir.chmod(0o700)  # Lattica writes the private key world-readable otherwise
    builder = (Lattica.builder()
               .with_listen_addrs([f"/ip4/0.0.0.0/tcp/{config.listen_port}"])
               .with_key_path(str(key_dir))
               .with_mdns(config.mdns)
               .with_upnp(False))
    bootstraps = [*config.bootstraps, *config.relays]
    if bootstraps:
        builder = builder.with_bootstraps(bootstraps)
    if config.relays:
        builder = builder.with_relay_servers(list(config.relays)).with_dcutr(True)
    if config.advertise_host:
        # without external addresses a peer advertises nothing dialable to the DHT
        builder = builder.with_external_addrs(
            [f"/ip4/{config.advertise_host}/tcp/{config.listen_port}"])
    try:
        peer = builder.build()
    except RuntimeError as exc:
        reason = "the port is in use" if "AddrInUse" in str(exc) else str(exc).splitlines()[0]
        raise OSError(f"cannot start the P2P peer on tcp port {config.listen_port}: {reason}"
                      ) from None
    key_file = key_dir / "p2p.key"
    if key_file.exists():
        key_file.chmod(0o600)
    _wait_for_bootstrap(peer, bootstraps)
    logger.info("P2P peer %s listening on tcp port %d", peer.peer_id(), config.listen_port)
    return peer


def _wait_for_bootstrap(peer, bootstraps: list[str], timeout_s: float = BOOTSTRAP_WAIT_S) -> None:
    """Give the dial of the bootstrap peers a moment: a call made while that first dial is
    under way can block in Lattica 1.0.21 instead of failing."""
    wanted = {address.rsplit("/p2p/", 1)[-1] for address in bootstraps}
    deadline = time.monotonic() + timeout_s
    while wanted and time.monotonic() < deadline:
        if wanted & set(peer.get_all_peers()):
            return
        time.sleep(0.01)


def peer_addresses(peer, host: str, port: int) -> list[str]:
    """Multiaddrs others can dial for this peer: its visible ones, else host:port."""
    visible = [a for a in peer.get_visible_maddrs() if "/p2p/" not in a]
    addresses = visible or [f"/ip4/{host}/tcp/{port}"]
    return [f"{a}/p2p/{peer.peer_id()}" for a in addresses]
