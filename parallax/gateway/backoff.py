"""Per-client backoff after wrong gateway passwords, and the plain-HTTP warning.

A client (one IPv4 address, or one IPv6 /64: what one machine usually holds) that sends
`limit` wrong passwords within `window_s` seconds is answered 429 with `Retry-After` for the next
`window_s` seconds, whatever it sends, the right password included: guessing stays at `limit`
tries per window. Only requests that present a Bearer credential count, so a client that merely
forgot the header is told 401 but never locked out. The table is an LRU of at most
`max_clients` entries: a flood of addresses cannot grow memory without bound.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from parallax.net import is_loopback_host

MAX_CLIENTS = 10_000


@dataclass
class _Client:
    failures: deque[float] = field(default_factory=deque)  # times of recent wrong passwords
    blocked_until: float = 0.0


class AuthFailureLimiter:
    """Counts wrong passwords per client; `retry_after` says how long a client is blocked."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self.clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def retry_after(self, client: str) -> int | None:
        """Whole seconds until `client` may try again, or None when it is not blocked."""
        entry = self._clients.get(client)
        if entry is None:
            return None
        left = entry.blocked_until - self.clock()
        return max(1, math.ceil(left)) if left > 0 else None

    def failed(self, client: str) -> None:
        """Record a wrong password; the `limit`-th within the window blocks the client."""
        now = self.clock()
        entry = self._clients.pop(client, None) or _Client()
        self._clients[client] = entry  # most recently used last
        while entry.failures and entry.failures[0] <= now - self.window_s:
            entry.failures.popleft()
        entry.failures.append(now)
        if len(entry.failures) >= self.limit:
            entry.blocked_until = now + self.window_s
            entry.failures.clear()
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        """The right password (from a client that is not blocked) clears its record."""
        self._clients.pop(client, None)

    def __len__(self) -> int:
        return len(self._clients)


def client_key(host: str | None) -> str:
    """The backoff key of a peer address: the IPv4 address, or the IPv6 /64."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def insecure_bind_warning(host: str, tls: bool) -> str | None:
    """The warning to print when the gateway listens beyond loopback without TLS, else None."""
    if tls or is_loopback_host(host):
        return None
    return (f"WARNING: the gateway listens on {host} without TLS: passwords and chats cross the "
            "network in the clear. Put it behind an HTTPS reverse proxy, pass a certificate, or "
            "bind --host 127.0.0.1.")
