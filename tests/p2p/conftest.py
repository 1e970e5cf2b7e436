"""Tests that start Lattica peers run only inside an isolated network namespace.

`tests/test_p2p_namespace.py` runs this directory under `unshare --net --mount` (loopback only,
so no packet — not even Lattica's STUN probe — leaves the machine) with PARALLAX_NETNS=1.
Collected any other way, these tests are skipped.
"""

import os

import pytest

IN_NAMESPACE = os.environ.get("PARALLAX_NETNS") == "1"


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    if IN_NAMESPACE:
        return
    skip = pytest.mark.skip(reason="Lattica tests run only in an isolated network namespace "
                                   "(tests/test_p2p_namespace.py starts them)")
    for item in items:
        if "tests/p2p/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
