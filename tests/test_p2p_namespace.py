"""Run tests/p2p inside a network namespace that has only loopback.

Lattica dials STUN servers on every start and offers no switch to stop it; inside a fresh
namespace nothing can leave the machine. Needs root (or user namespaces) and util-linux
`unshare`; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

ROOT = Path(__file__).resolve().parent.parent


def _namespace_prefix() -> list[str] | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    prefix = ["unshare", "--net", "--mount"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


@pytest.mark.slow
def test_p2p_suite_in_isolated_namespace(tmp_path):
    prefix = _namespace_prefix()
    require(prefix is not None, "network namespaces are unavailable here (needs root and "
            "unshare/ip); the P2P tests would reach the internet")
    env = {**os.environ, "PARALLAX_NETNS": "1", "PARALLAX_P2P_HOME": str(tmp_path / "keys")}
    command = f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider tests/p2p"
    result = subprocess.run([*prefix, "sh", "-c", command], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    print(result.stdout[-20000:], result.stderr[-5000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
