"""Test certificates: a throwaway CA and one leaf certificate for 127.0.0.1 / localhost, made
with the openssl command line (what an operator would use too; see SECURITY.md)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class CertFiles:
    ca: Path  # the CA certificate every side trusts
    cert: Path  # leaf certificate for 127.0.0.1 and localhost, signed by the CA
    key: Path
    other_ca: Path  # an unrelated CA: a client trusting only it must refuse the leaf


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", key.name, "-out", cert.name, cwd=directory)
    return cert, key


def make_test_certs(directory: Path) -> CertFiles:
    """Write a CA, a leaf signed by it (SAN: IP 127.0.0.1, DNS localhost) and another CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _make_ca(directory, "test-ca")
    other_ca, _ = _make_ca(directory, "other-ca")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "node.key", "-out", "node.csr", cwd=directory)
    _openssl("x509", "-req", "-in", "node.csr", "-CA", ca.name, "-CAkey", ca_key.name,
             "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "node.pem",
             cwd=directory)
    return CertFiles(ca, directory / "node.pem", directory / "node.key", other_ca)
