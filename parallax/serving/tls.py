"""TLS for the HTTP servers and clients of the direct mode (`--tls-certfile/--tls-keyfile`,
`--tls-ca-file`).

One switch per command: a server given a certificate and its key serves https only; a client
that has TLS on (its own certificate, a CA file, or an `https://` scheduler address) speaks https
and checks the other side's certificate against the CA file (or the system's CAs without one).
Nodes with a certificate also encrypt their activation links with ZeroMQ CURVE (node/links.py).
P2P mode is encrypted by libp2p already and takes no TLS options.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


class TLSConfigError(ValueError):
    """A TLS option is wrong; the message names the flag and the file."""


@dataclass(frozen=True)
class TLSConfig:
    """The TLS files of one command (all None: plain HTTP)."""

    certfile: str | None = None  # this server's certificate chain (PEM)
    keyfile: str | None = None  # its private key (PEM)
    ca_file: str | None = None  # CA bundle that the other side's certificate must chain to

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise TLSConfigError("give --tls-certfile and --tls-keyfile together")
        for flag, path in (("--tls-certfile", self.certfile), ("--tls-keyfile", self.keyfile),
                           ("--tls-ca-file", self.ca_file)):
            if path is not None and not Path(path).expanduser().is_file():
                raise TLSConfigError(f"{flag} {path}: no such file")
        if self.certfile is not None:  # a wrong pair fails here, not at the first handshake
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    self.certfile, self.keyfile)
            except (ssl.SSLError, OSError) as exc:
                raise TLSConfigError(f"cannot use --tls-certfile {self.certfile} with "
                                  f"--tls-keyfile {self.keyfile}: {exc}") from None
        if self.ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise TLSConfigError(f"cannot read --tls-ca-file {self.ca_file}: {exc}") from None

    @property
    def serves_tls(self) -> bool:
        """Whether this command's own server speaks https."""
        return self.certfile is not None

    @property
    def enabled(self) -> bool:
        """Whether any TLS option was given (clients then speak https too)."""
        return self.serves_tls or self.ca_file is not None

    @property
    def scheme(self) -> str:
        """The URL scheme of this command's own server."""
        return "https" if self.serves_tls else "http"

    def uvicorn_kwargs(self) -> dict[str, str]:
        """The `uvicorn.Config` arguments that make a server https (none for plain HTTP)."""
        if not self.serves_tls:
            return {}
        return {"ssl_certfile": self.certfile, "ssl_keyfile": self.keyfile}

    def client_verify(self) -> ssl.SSLContext | bool:
        """httpx's `verify`: the CA file's context, else the system's CAs."""
        if self.ca_file is not None:
            return ssl.create_default_context(cafile=self.ca_file)
        return True


NO_TLS = TLSConfig()


def with_scheme(address: str, tls: bool) -> str:
    """`HOST:PORT` → `https://HOST:PORT` or `http://HOST:PORT`; a full URL is kept as it is
    (and only made https when `tls`: a TLS client never falls back to plain HTTP)."""
    address = address.strip().rstrip("/")
    if address.startswith("https://"):
        return address
    if address.startswith("http://"):
        address = address[len("http://"):]
        return f"https://{address}" if tls else f"http://{address}"
    return f"{'https' if tls else 'http'}://{address}"
