"""Parallax: decentralized LLM inference over heterogeneous machines."""

import os

# OpenMP (torch's and the packed-weight kernels') spins while it waits at the end of each
# parallel region: libgomp's default is 300 000 spins. On a machine with other work a spinning
# thread holds the core the thread it waits for needs, and each of a step's ~200 regions then
# costs a scheduler slice (decode 4-15x slower, benchmarks/omp_wait_bench.py). A short spin
# costs nothing on a quiet machine and avoids most of that; OMP_WAIT_POLICY=PASSIVE (several
# processes on one machine: tests, scripts/run-local-cluster.sh) avoids all of it but costs
# ~18 % of batch-1 decode on a quiet one. Set before torch loads libgomp; a user's choice wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
