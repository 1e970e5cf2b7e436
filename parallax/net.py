"""Small socket helpers every role uses: this machine's LAN address, binding a listening port up
front, how a bound host is written in a URL, and reading an address (IP literal, loopback).
Standard library only (no torch, no servers)."""

from __future__ import annotations

import ipaddress
import socket

WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # bind addresses that mean "every interface"
LOOPBACK_NAMES = ("localhost", "localhost.")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_of(host: str | None) -> IPAddress | None:
    """The IP address `host` spells (brackets and an IPv6 zone allowed; an IPv4-mapped IPv6
    address as its IPv4 one, which is how a dual-stack socket reports an IPv4 client), or None
    for a name or anything else."""
    if not host:
        return None
    text = host.strip().lower().removeprefix("[").removesuffix("]").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def is_loopback_host(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (brackets and a zone allowed); False for anything else."""
    if host and host.strip().lower() in LOOPBACK_NAMES:
        return True
    address = ip_of(host)
    return address is not None and address.is_loopback


def lan_address() -> str:
    """This machine's address on its default-route interface (no packet is sent), else loopback."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        return probe.getsockname()[0]
    except OSError:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    finally:
        probe.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the HTTP port up front so a busy port fails with a clear message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


def url_host(host: str) -> str:
    """A host usable in a URL the operator can click (wildcards → loopback)."""
    if host == "0.0.0.0":
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
