"""Behaviour does not change: greedy SSE streams equal the recordings made before a refactor.

A few greedy chat requests (temperature 0, small `max_tokens`, one with logprobs, one ending on
a stop string) go to `parallax serve` on the built-in model (one node) and through the
scheduler of a loopback 2-node pipeline. Each raw SSE body, after normalizing only what is
legitimately random, must equal its file in tests/recordings/streams/ byte for byte: event
order, chunk boundaries, fields, field order, text, token ids and counts.

Normalized (see `normalize`): the `chatcmpl-` id, `created`, the timing figures of `metrics`
(milliseconds, tokens per second, hop times, the hop bytes acked in time, the slowest stage), a
stage's node id (it carries a random port) and layer range (the split follows the speeds the
nodes measure when they start), and logprob floats beyond 3 decimals (the last bits of a
float32 logprob depend on the CPU's kernels, not on our code).

Re-record (only when a change of behaviour is intended, and say so in the commit):
    PARALLAX_RECORD_STREAMS=1 pytest tests/test_stream_recordings.py
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from processes import die_with_pytest, free_port, wait_healthy
from test_cluster import START_TIMEOUT_S, LocalCluster, running, split_memory

pytestmark = pytest.mark.slow

RECORDINGS = Path(__file__).parent / "recordings" / "streams"
RECORD = os.environ.get("PARALLAX_RECORD_STREAMS") == "1"

REQUESTS: dict[str, dict] = {
    "france-logprobs": {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 6, "logprobs": True, "top_logprobs": 2,
        "stream_options": {"include_usage": True}},
    "colors": {
        "messages": [{"role": "user", "content": "List three primary colors."}],
        "max_tokens": 10},
    "recursion-stop": {
        "messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "Explain recursion in one sentence."}],
        "max_tokens": 12, "stop": [" itself"]},
}

# numbers that measure time, not behaviour ("steps", token counts and layer ranges stay)
TIMING_KEYS = ("ttft_ms", "tps", "duration_ms", "compute_ms", "queue_ms", "ms_per_token",
               "replay_ms")
_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_ID = re.compile(r'"id":"chatcmpl-[0-9a-zA-Z]+"')
_CREATED = re.compile(r'"created":\d+')
_TIMING = re.compile(r'"(' + "|".join(TIMING_KEYS) + r')":' + _NUMBER)
_LOGPROB = re.compile(r'"logprob":(' + _NUMBER + ")")
# a hop's time and bytes count the sends acked by the time the last token left (tracing.py)
_HOPS = re.compile(r'"(hops_ms|hop_bytes)":\[[^\]]*\]')
_SLOWEST = re.compile(r'"slowest_stage":\d+')
# a node's id carries its port; the layer split follows the speeds the nodes measure at start
_NODE_ID = re.compile(r'"node_id":"[^"]*"')
_LAYERS = re.compile(r'"layers":\[\d+,\d+\]')


def normalize(body: str) -> str:
    """`body` with its random parts replaced by fixed ones; every other byte as it came."""
    body = _ID.sub('"id":"chatcmpl-ID"', body)
    body = _CREATED.sub('"created":0', body)
    body = _TIMING.sub(lambda m: f'"{m.group(1)}":0', body)
    body = _HOPS.sub(lambda m: f'"{m.group(1)}":[]', body)
    body = _SLOWEST.sub('"slowest_stage":0', body)
    body = _NODE_ID.sub('"node_id":"NODE"', body)
    body = _LAYERS.sub('"layers":[0,0]', body)
    return _LOGPROB.sub(lambda m: f'"logprob":{float(m.group(1)):.3f}', body)


def stream_body(base_url: str, request: dict) -> str:
    """The raw text of one streamed chat answer."""
    body = {"model": "default", "temperature": 0, "stream": True, **request}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        return response.read().decode()


def check_against_recording(target: str, name: str, body: str) -> None:
    path = RECORDINGS / f"{target}-{name}.sse"
    text = normalize(body)
    if RECORD:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"no recording {path}; record with PARALLAX_RECORD_STREAMS=1"
    recorded = path.read_text()
    if text != recorded:
        diff = "".join(difflib.unified_diff(recorded.splitlines(True), text.splitlines(True),
                                            f"recorded {path.name}", "now"))
        pytest.fail(f"the {target} stream of {name!r} changed:\n{diff}")


class PinnedCluster(LocalCluster):
    """Two nodes that hold half the model each, one CPU thread each (stable float order)."""

    def node_args(self) -> list[str]:
        return ["--threads", "1"]


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """{target: base URL} for a single node and a 2-node pipeline, started together."""
    tmp = tmp_path_factory.mktemp("recordings")
    port = free_port()
    log_path = tmp / "serve.log"
    log = open(log_path, "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "parallax.cli", "serve", "--port", str(port), "--threads", "1",
         "--kv-memory", "64MB", "--no-warmup"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(tmp)},
        preexec_fn=die_with_pytest)
    try:
        cluster = PinnedCluster(tmp, num_nodes=2, memory=split_memory())
        with running(cluster, START_TIMEOUT_S):
            single = f"http://127.0.0.1:{port}"
            wait_healthy(single, serve, log_path, START_TIMEOUT_S)
            yield {"single": single, "pipeline": cluster.url}
    finally:
        serve.kill()
        serve.wait(10)
        log.close()


@pytest.mark.parametrize("target", ["single", "pipeline"])
def test_greedy_streams_equal_the_recordings(targets, target):
    for name, request in REQUESTS.items():
        check_against_recording(target, name, stream_body(targets[target], request))


def test_normalize_keeps_everything_but_ids_time_and_float_noise():
    raw = ('data: {"id":"chatcmpl-ab12","created":1796519913,"choices":[{"logprobs":'
           '{"content":[{"token":"A","logprob":-1.8826884031295776}]}}],"metrics":'
           '{"ttft_ms":475.63,"tps":15.45,"stages":[{"node_id":"vm-37097","layers":[0,16],'
           '"steps":6}],"hops_ms":[151.18,129.97],"hop_bytes":[80640,1175],"slowest_stage":1}}\n\n')
    assert normalize(raw) == (
        'data: {"id":"chatcmpl-ID","created":0,"choices":[{"logprobs":{"content":[{"token":'
        '"A","logprob":-1.883}]}}],"metrics":{"ttft_ms":0,"tps":0,"stages":[{"node_id":"NODE",'
        '"layers":[0,0],"steps":6}],"hops_ms":[],"hop_bytes":[],"slowest_stage":0}}\n\n')
