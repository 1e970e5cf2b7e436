#!/usr/bin/env bash
# `make run`: a scheduler and two nodes on this machine, splitting the built-in model's 30
# layers between them. Each node gets less memory than the whole model needs (see
# GET /model/list), so the scheduler must split it. Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
PARALLAX=${PARALLAX:-.venv/bin/parallax}
# Several processes share this machine's cores: OpenMP threads sleep at once while they wait
# (parallax/__init__.py explains; benchmarks/omp_wait_bench.py measures).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
PYTHON=${PYTHON:-.venv/bin/python}
SCHEDULER_PORT=${SCHEDULER_PORT:-3001}
NODE_MEMORY=${NODE_MEMORY:-200MB}  # the packed built-in model needs ~320 MB on one node

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$PARALLAX" run -m SmolLM2-135M-Instruct -n 2 --port "$SCHEDULER_PORT" --no-mdns &
pids+=($!)
"$PARALLAX" join -s "127.0.0.1:$SCHEDULER_PORT" --port 3000 --memory "$NODE_MEMORY" &
pids+=($!)
"$PARALLAX" join -s "127.0.0.1:$SCHEDULER_PORT" --port 3010 --memory "$NODE_MEMORY" &
pids+=($!)

for _ in $(seq 1 180); do
    if "$PYTHON" -c "import json, sys, urllib.request as u; sys.exit(json.load(u.urlopen(
'http://127.0.0.1:$SCHEDULER_PORT/cluster/status_json', timeout=2))['data']['status']
!= 'available')" 2>/dev/null; then
        echo
        echo "Parallax cluster ready: web UI http://127.0.0.1:$SCHEDULER_PORT/ ," \
             "OpenAI API http://127.0.0.1:$SCHEDULER_PORT/v1 (Ctrl-C stops it)"
        break
    fi
    sleep 1
done
wait -n "${pids[@]}"
