"""Which hosts a joining node may advertise (in its `http_url` and `activation_endpoint`).

The scheduler sends chat requests and health probes to a node's `http_url`, lists it to other
nodes as a probe target, and hands its `activation_endpoint` to the previous stage of its
pipeline. Were any host accepted, a join-token holder could point the scheduler and every
node at a third party or at a port inside the operator's network (request amplification,
SSRF). So by default a node may advertise only the address its join connection comes from;
the scheduler machine's own addresses count as one (every loopback form and its LAN address).
`parallax run --allow-advertised-hosts` lists what a node may advertise besides: networks
(`10.0.0.0/8`, one IP) for nodes behind NAT, on a second interface or reached through proxies,
and host names (`gpu1.lan`, or `*.lan` for every name under `lan`). Names are never resolved
here: the address a name stands for may change after the check (DNS rebinding), so only listed
names pass.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from parallax.net import ip_of, is_loopback_host

FLAG = "--allow-advertised-hosts"
_NAME = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*)(\.[a-z0-9_-]+)*$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AdvertiseAllowList:
    """Hosts a node may advertise whatever address it connects from (parsed `FLAG` entries)."""

    networks: tuple[Network, ...] = ()
    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # "*.lan" -> ".lan"

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AdvertiseAllowList:
        """From CIDRs, IPs, host names and `*.domain` patterns; ValueError says the fix."""
        networks: list[Network] = []
        names: set[str] = set()
        suffixes: list[str] = []
        for entry in entries:
            text = entry.strip().lower() if isinstance(entry, str) else ""
            if "/" in text or ip_of(text) is not None:
                networks.append(_network(text))
            elif _NAME.match(text.rstrip(".")):
                name = text.rstrip(".")
                if name.startswith("*."):
                    suffixes.append(name[1:])
                else:
                    names.add(name)
            else:
                raise ValueError(f"{FLAG} takes CIDR networks (10.0.0.0/8), IP addresses, host "
                                 f"names or *.domain patterns, comma-separated; got {entry!r} "
                                 "(to allow every address write 0.0.0.0/0,::/0)")
        return cls(tuple(networks), frozenset(names), tuple(suffixes))

    def allows(self, host: str) -> bool:
        """True when `host` (an IP literal or a name, as advertised) is on the list."""
        address = ip_of(host)
        if address is not None:
            return any(address in network for network in self.networks)
        name = host.strip().lower().rstrip(".")
        return name in self.names or any(name.endswith(s) for s in self.suffixes)


def _network(text: str) -> Network:
    try:
        network = ipaddress.ip_network(text.removeprefix("[").replace("]", ""))
    except ValueError as exc:
        raise ValueError(f"{FLAG}: {text!r} is not a network: {exc} (write e.g. 10.0.0.0/8, "
                         "fd00::/8 or one address)") from None
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None:  # ::ffff:10.0.0.0/104 means 10.0.0.0/8 (addresses are unmapped)
        network = ipaddress.ip_network(f"{mapped}/{max(network.prefixlen - 96, 0)}")
    return network


def may_advertise(host: str, peer: str | None, allowed: AdvertiseAllowList,
                  own: Collection[str] = ()) -> bool:
    """True when a node whose join connection comes from `peer` (the TCP peer address) may
    advertise `host`: the same address, or one `allowed` lists. The scheduler machine's own
    addresses count as one: loopback in every form (127.0.0.1, ::1, localhost) and `own` (its
    LAN address), so a node beside the scheduler may join over loopback and advertise the LAN
    address. A name equals no address (it is not resolved): only `allowed` admits it."""
    if allowed.allows(host):
        return True
    own_ips = {ip_of(a) for a in own} - {None}

    def this_machine(value: str | None) -> bool:
        return is_loopback_host(value) or ip_of(value) in own_ips

    if this_machine(host) and this_machine(peer):
        return True
    address = ip_of(host)
    return address is not None and address == ip_of(peer)


def advertise_refusal(node_id: str, host: str, peer: str | None, allowed: AdvertiseAllowList,
                      own: Collection[str] = ()) -> str | None:
    """None when `node_id` may advertise `host` (:func:`may_advertise`), else the message
    that refuses its join: it names both fixes, the scheduler's flag or the node advertising
    the address it connects from."""
    if may_advertise(host, peer, allowed, own):
        return None
    seen = peer or "an unknown address"
    return (f"node {node_id} advertises host {host!r} but its join came from {seen}: a node "
            f"may advertise only the address it connects from, so that no one can point the "
            f"cluster's traffic elsewhere. If {host!r} really is that node (NAT, a second "
            f"interface, a proxy), start the scheduler with {FLAG} {host} (networks "
            f"such as 10.0.0.0/8, IPs or host names, comma-separated); or start the node with "
            f"--advertise-host set to the address the scheduler sees")
