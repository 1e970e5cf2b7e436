"""Finding a scheduler on the local network by mDNS (python-zeroconf).

The scheduler advertises `_parallax._tcp.local.` with its HTTP port; `parallax join` without
`-s` browses for it. Gradient's Parallax users report mDNS failing when scheduler and node
share a machine: we advertise every interface address, loopback included, and the node
prefers an address it can actually connect to.
"""

from __future__ import annotations

import socket
import time

SERVICE_TYPE = "_parallax._tcp.local."


def _addresses(host: str) -> list[bytes]:
    if host not in ("0.0.0.0", "::", ""):
        return [socket.inet_aton(socket.gethostbyname(host))]
    addresses = {"127.0.0.1"}
    try:
        addresses.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None,
                                                                    socket.AF_INET))
    except OSError:
        pass
    return [socket.inet_aton(a) for a in sorted(addresses)]


class Advertiser:
    """Keeps the scheduler's mDNS record registered until closed."""

    def __init__(self, host: str, port: int, model: str | None = None) -> None:
        from zeroconf import ServiceInfo, Zeroconf

        name = f"parallax-{socket.gethostname()}-{port}.{SERVICE_TYPE}"
        self.info = ServiceInfo(SERVICE_TYPE, name, port=port, addresses=_addresses(host),
                                properties={"model": model or ""})
        self.zeroconf = Zeroconf()
        self.zeroconf.register_service(self.info, allow_name_change=True)

    def close(self) -> None:
        try:
            self.zeroconf.unregister_service(self.info)
        finally:
            self.zeroconf.close()


def _reachable(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_scheduler(timeout_s: float = 10.0) -> str | None:
    """HOST:PORT of the first reachable advertised scheduler, or None after the timeout."""
    from zeroconf import ServiceBrowser, Zeroconf

    zeroconf = Zeroconf()
    found: list[str] = []

    class Listener:
        def add_service(self, zc, type_, name):
            info = zc.get_service_info(type_, name, timeout=2000)
            if info is None:
                return
            for address in info.parsed_addresses():
                if _reachable(address, info.port):
                    found.append(f"{address}:{info.port}")
                    return

        def update_service(self, zc, type_, name):
            self.add_service(zc, type_, name)

        def remove_service(self, zc, type_, name):
            pass

    browser = ServiceBrowser(zeroconf, SERVICE_TYPE, Listener())
    try:
        deadline = time.monotonic() + timeout_s
        while not found and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        browser.cancel()
        zeroconf.close()
    return found[0] if found else None
