"""Parallax: decentralized LLM inference over heterogeneous machines."""

import os

# OpenMP (torch's and the packed-weight kernels') spins while it waits at the end of each
# parallel region. On a machine with other work, a spinning thread holds a core the thread it
# waits for needs, and every one of a step's ~200 regions then costs a scheduler slice: decode
# on a loaded 2-core machine was measured 10-15x slower spinning than sleeping
# (benchmarks/omp_wait_bench.py). Set before torch loads libgomp; a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
