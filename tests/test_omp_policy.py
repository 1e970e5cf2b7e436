"""OpenMP's wait policy: `import parallax` shortens libgomp's spin unless the user chose."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each case starts an interpreter that imports torch

PROBE = ("import parallax, torch, os; "
         "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")


@pytest.mark.parametrize(("given", "expected"), [
    ({}, "None 10000"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),
    ({"GOMP_SPINCOUNT": "300000"}, "None 300000"),
])
def test_parallax_spins_briefly_unless_the_user_chose(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **given}, text=True,
                         capture_output=True, timeout=120, check=True).stdout
    assert out.split("\n")[0] == expected


def test_the_cli_imports_parallax_before_torch():
    """The policy is read once, when torch loads libgomp: the package must come first."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "parallax.cli", "--help"],
                         text=True, capture_output=True, timeout=120)
    order = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    assert "parallax" in order
    assert "torch" not in order or order.index("parallax") < order.index("torch")
