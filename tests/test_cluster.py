"""A real loopback cluster: `parallax run` + three `parallax join` nodes on the built-in model.

Each node gets 600 MB, less than the whole model needs in fp32, so the scheduler builds one
pipeline of two nodes and keeps the third on standby. Greedy answers through the scheduler
equal the whole model in one process; killing a pipeline node fails its in-flight request
quickly, and the cluster heals with the standby node without any manual step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from processes import die_with_pytest, free_port
from structured_helpers import WEATHER_TOOL, assert_fruit_json_always_validates, check_schema

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models.hub import builtin_gguf_path
from parallax.models.loader import load_shard, load_tokenizer
from parallax.serving.sse import parse_sse_lines

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 240
KILLED_STREAM_ENDS_WITHIN_S = 7.0
PROMPTS = ["What is the capital of France?", "List three primary colors.",
           "Explain recursion in one sentence."]


@contextlib.contextmanager
def running(cluster: LocalCluster, timeout: float = START_TIMEOUT_S) -> Iterator[LocalCluster]:
    """`cluster` once it is available (a module fixture's body); always closed after."""
    try:
        cluster.wait_status({"available"}, timeout)
        yield cluster
    finally:
        cluster.close()


def split_memory(share: float = 0.6) -> str:
    """A node budget that holds part of the built-in model only (under the scheduler's own
    sizing, which counts packed GGUF bytes), so two nodes form one 2-stage pipeline and a
    third stays on standby."""
    from parallax.models.hub import DEFAULT_MODEL
    from parallax.scheduler.catalog import ModelCatalog, solo_memory_bytes

    spec = ModelCatalog("float32").spec(DEFAULT_MODEL)
    return f"{int(share * solo_memory_bytes(spec) / 2**20)}MB"


class LocalCluster:
    # replay on failure is off here: the kill test below checks that a lost stage fails the
    # head's requests at once (test_failover_cluster.py checks that they are continued)
    max_replays = 0
    # a dead node's in-flight requests fail on the broken link, well before a heartbeat
    # timeout: the gap between KILLED_STREAM_ENDS_WITHIN_S and this leaves a loaded machine
    # headroom
    heartbeat_timeout_s = 10

    def __init__(self, tmp_path, num_nodes: int, memory: str) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.memory = memory
        self.env = {**os.environ, "TMPDIR": str(tmp_path)}
        self.scheduler = self._spawn("scheduler", ["run", "-m", "SmolLM2-135M-Instruct", "-n",
                                                   "2", "--port", str(self.port), "--no-mdns",
                                                   "--retry-attempts", "3",
                                                   "--retry-interval", "1",
                                                   "--heartbeat-timeout",
                                                   str(self.heartbeat_timeout_s),
                                                   "--max-replays", str(self.max_replays),
                                                   *self.scheduler_args()])
        self.join_target = self.scheduler_target()
        self.node_ports = [free_port() for _ in range(num_nodes)]
        self.nodes = {port: self.start_node(port) for port in self.node_ports}

    def scheduler_args(self) -> list[str]:
        return []

    def scheduler_target(self) -> str:
        """What nodes pass as `-s`."""
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "parallax.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env,
                                preexec_fn=die_with_pytest)

    def start_node(self, port: int) -> subprocess.Popen:
        return self._spawn(f"node-{port}", [
            "join", "-s", self.join_target, "--port", str(port), "--activation-port",
            str(free_port()), "--memory", self.memory, "--max-batch-size", "8", "--no-warmup",
            *self.node_args()])

    def node_args(self) -> list[str]:
        return []

    def status(self) -> dict:
        return httpx.get(f"{self.url}/cluster/status_json", timeout=5).json()["data"]

    def wait_status(self, wanted: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if last["status"] in wanted:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"cluster not {wanted} after {timeout} s: {last}")

    def close(self) -> None:
        for proc in [*self.nodes.values(), self.scheduler]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.nodes.values(), self.scheduler]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def kill_node_mid_stream(cluster: LocalCluster, port: int, events_before: int = 5) -> float:
    """Kill node `port` (frontend and executor, as a power cut would) while a stream runs;
    check that the stream ends with an error event and [DONE]; return how long that took."""
    body = {"model": "default", "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        for event in parse_sse_lines(lines):
            events.append(event)
            if len(events) == events_before:
                break
        proc = cluster.nodes[port]
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        killed_at = time.monotonic()
        proc.kill()
        for child in children:
            os.kill(int(child), signal.SIGKILL)
        for event in parse_sse_lines(lines):
            events.append(event)
        ended_after = time.monotonic() - killed_at
    finals = [e for e in events if isinstance(e, dict) and e.get("choices")
              and e["choices"][0].get("finish_reason")]
    assert finals and finals[-1]["choices"][0]["finish_reason"] == "error"
    assert events[-1] == "[DONE]"
    return ended_after


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), num_nodes=3, memory=split_memory())
    try:
        cluster.wait_status({"available"}, START_TIMEOUT_S)
        yield cluster
    finally:
        cluster.close()


def whole_model(prompts: list[list[int]], params: SamplingParams) -> list[list]:
    """The engine outputs of the whole model in this process (what `parallax serve` returns),
    one list per prompt."""
    path = builtin_gguf_path()
    tokenizer = load_tokenizer(path)
    engine = Engine(load_shard(path).model, EngineConfig(kv_memory_bytes=64 * 2**20),
                    eos_token_ids=[tokenizer.eos_token_id])
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    outputs: dict[str, list] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            if o.token_id is not None:
                outputs[o.request_id].append(o)
    return [outputs[str(i)] for i in range(len(prompts))]


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def reference_answers():
    """Greedy answers of the whole model in this process (what `parallax serve` returns)."""
    tokenizer = load_tokenizer(builtin_gguf_path())
    outputs = whole_model([chat_prompt_ids(tokenizer, p) for p in PROMPTS],
                          SamplingParams(temperature=0, max_tokens=24))
    return [tokenizer.decode([o.token_id for o in out], skip_special_tokens=True)
            for out in outputs]


def test_split_across_two_nodes_with_a_standby(cluster):
    status = cluster.status()
    assert len(status["pipelines"]) == 1 and len(status["pipelines"][0]) == 2
    ranges = sorted((n["start_layer"], n["end_layer"]) for n in status["node_list"]
                    if n["start_layer"] is not None)
    assert ranges[0][0] == 0 and ranges[-1][1] == 30 and ranges[0][1] == ranges[1][0]
    assert len(status["node_list"]) == 3


def assert_greedy_answers(cluster: LocalCluster, reference_answers: list[str]) -> openai.OpenAI:
    """Each prompt's greedy answer through the scheduler equals the whole model's."""
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", timeout=120)
    for prompt, expected in zip(PROMPTS, reference_answers, strict=True):
        answer = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=24)
        assert answer.choices[0].message.content == expected
    return client


def test_greedy_answers_equal_whole_model(cluster, reference_answers):
    client = assert_greedy_answers(cluster, reference_answers)
    streamed = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0,
        max_tokens=24, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == reference_answers[0] and "Paris" in text


def test_completions_and_responses_through_the_pipeline(cluster, reference_answers):
    """/v1/completions (the raw prompt, no template) and /v1/responses (translated into the
    chat request) through the 2-node pipeline answer as the whole model does."""
    path = builtin_gguf_path()
    tokenizer = load_tokenizer(path)
    prompt = "The capital of France is"
    engine = Engine(load_shard(path).model, EngineConfig(kv_memory_bytes=16 * 2**20),
                    eos_token_ids=[tokenizer.eos_token_id])
    engine.add_request("0", tokenizer.encode(prompt), SamplingParams(temperature=0,
                                                                     max_tokens=8))
    ids: list[int] = []
    while engine.has_work():
        ids += [o.token_id for o in engine.step()]
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", timeout=120)
    completion = client.completions.create(model="default", prompt=prompt, max_tokens=8,
                                           temperature=0)
    assert completion.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True)
    streamed = client.completions.create(model="default", prompt=prompt, max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    response = client.responses.create(model="default", input=PROMPTS[0], temperature=0,
                                       max_output_tokens=24)
    assert response.output_text == reference_answers[0]


def test_structured_outputs_through_the_pipeline(cluster):
    """The last stage of the 2-node pipeline applies the grammar: 20 sampled SmolLM2 answers
    (temperature 1.0, max_tokens 160) under a json_schema all validate, and a forced tool call
    always parses with arguments that validate against the tool's parameters."""
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", timeout=600,
                           max_retries=0)

    def ask_tool(seed: int):
        return client.chat.completions.create(
            model="default", temperature=1.0, seed=seed, max_tokens=160,
            messages=[{"role": "user", "content": "What is the weather in Rome?"}],
            tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False)

    assert_fruit_json_always_validates(client, workers=8)
    with ThreadPoolExecutor(4) as pool:
        calls = list(pool.map(ask_tool, range(4)))
    for answer in calls:
        assert answer.choices[0].finish_reason == "tool_calls"
        (call,) = answer.choices[0].message.tool_calls[:1]
        assert call.function.name == "get_weather"
        check_schema(json.loads(call.function.arguments),
                     WEATHER_TOOL["function"]["parameters"])


def assert_logprobs_equal(entries: list, expected: list, tokenizer, top: int) -> None:
    """OpenAI `logprobs.content` entries (dicts) against the whole model's engine outputs."""
    assert len(entries) == len(expected)
    for entry, output in zip(entries, expected, strict=True):
        assert entry["token"] == tokenizer.decode([output.token_id])
        assert entry["logprob"] == pytest.approx(output.logprob, abs=1e-3)
        assert len(entry["top_logprobs"]) == top
        for alt, (token_id, logprob) in zip(entry["top_logprobs"], output.top_logprobs,
                                            strict=True):
            assert alt["token"] == tokenizer.decode([token_id])
            assert alt["logprob"] == pytest.approx(logprob, abs=1e-3)


def test_logprobs_through_the_pipeline(cluster):
    """`logprobs` / `top_logprobs` come back from the pipeline's last stage through the head
    and equal the whole model's in one process: chat (stream and not) and completions."""
    tokenizer = load_tokenizer(builtin_gguf_path())
    prompt = "The capital of France is"
    chat_ref, text_ref = whole_model(
        [chat_prompt_ids(tokenizer, PROMPTS[0]), tokenizer.encode(prompt)],
        SamplingParams(temperature=0, max_tokens=8, logprobs=True, top_logprobs=5))
    url = f"{cluster.url}/v1"
    body = {"model": "default", "messages": [{"role": "user", "content": PROMPTS[0]}],
            "temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 5}
    answer = httpx.post(f"{url}/chat/completions", json=body, timeout=120).json()
    assert_logprobs_equal(answer["choices"][0]["logprobs"]["content"], chat_ref, tokenizer, 5)
    with httpx.stream("POST", f"{url}/chat/completions", json={**body, "stream": True},
                      timeout=120) as response:
        events = list(parse_sse_lines(response.iter_lines()))
    streamed = [entry for e in events if isinstance(e, dict) and e.get("choices")
                and e["choices"][0].get("logprobs")
                for entry in e["choices"][0]["logprobs"]["content"]]
    assert_logprobs_equal(streamed, chat_ref, tokenizer, 5)
    legacy = httpx.post(f"{url}/completions", json={
        "model": "default", "prompt": prompt, "temperature": 0, "max_tokens": 8,
        "logprobs": 3}, timeout=120).json()["choices"][0]["logprobs"]
    assert legacy["tokens"] == [tokenizer.decode([o.token_id]) for o in text_ref]
    assert legacy["token_logprobs"] == pytest.approx([o.logprob for o in text_ref], abs=1e-3)
    for alternatives, output in zip(legacy["top_logprobs"], text_ref, strict=True):
        expected = {tokenizer.decode([i]): lp for i, lp in output.top_logprobs[:3]}
        assert alternatives == pytest.approx(expected, abs=1e-3)


def test_killed_node_fails_in_flight_request_then_cluster_heals(cluster):
    status = cluster.status()
    pipeline = status["pipelines"][0]
    tail_id = pipeline[-1]
    tail_port = next(p for p in cluster.node_ports if tail_id.endswith(f"-{p}"))
    ended_after = kill_node_mid_stream(cluster, tail_port)
    # the broken link ended it, not a heartbeat timeout
    assert ended_after < KILLED_STREAM_ENDS_WITHIN_S < cluster.heartbeat_timeout_s
    # the scheduler evicts the silent node (heartbeat timeout), then reallocates
    deadline = time.monotonic() + 30
    while tail_id in [n["node_id"] for n in cluster.status()["node_list"]]:
        assert time.monotonic() < deadline, "the dead node was never evicted"
        time.sleep(0.5)
    healed = cluster.wait_status({"available"}, START_TIMEOUT_S)
    assert tail_id not in {n for p in healed["pipelines"] for n in p}
    assert len(healed["pipelines"][0]) == 2  # the standby node took the lost layers
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", timeout=120)
    answer = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0,
        max_tokens=8)
    assert answer.choices[0].message.content
    # the killed node comes back with the same identity: listed once, not twice
    cluster.nodes[tail_port] = cluster.start_node(tail_port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ids = [n["node_id"] for n in cluster.status()["node_list"]]
        if tail_id in ids:
            break
        time.sleep(0.5)
    ids = [n["node_id"] for n in cluster.status()["node_list"]]
    assert ids.count(tail_id) == 1 and len(ids) == len(set(ids)) == 3
