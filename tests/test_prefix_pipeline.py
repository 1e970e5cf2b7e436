"""Prefix caching across pipeline stages (issue 15, part 1).

Fast tests drive engines joined by real ZeroMQ links in one process (a tiny random Llama):
the head asks the later stages how much of a cached prefix they hold (LinkPrefixQuery), every
stage starts the request there, and the head recomputes only what a later stage lost. The slow
test runs a 6-turn conversation through a real 2-node loopback cluster on the built-in model and
reads the counters from each node's /health.
"""

from __future__ import annotations

import random
import time

import pytest
from processes import free_port
from test_pipeline_links import KEY, Cluster
from tiny_models import greedy_tokens, save_tiny_model

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models.loader import load_shard
from parallax.node import stage as stage_module
from parallax.node.links import LinkLimits, prefix_problem
from parallax.protocol.common import encode
from parallax.protocol.links import LinkPrefixAnswer, LinkPrefixQuery, decode_link

BLOCK = 16
HIDDEN = 64  # the tiny model's hidden size (float32 activations)
# KV bytes of one block of one layer of the tiny Llama: K+V, 2 kv heads, head dim 16, fp32
LAYER_BLOCK_BYTES = 2 * 2 * 16 * BLOCK * 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("prefix"), "llama")[0]


@pytest.fixture(scope="module")
def whole(model_path):
    return load_shard(model_path).model


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of the whole model with prefix caching off."""
    return greedy_tokens(model, [prompt], max_tokens, enable_prefix_caching=False)[0]


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 256) for _ in range(n)]


class KVCluster(Cluster):
    """Cluster of test_pipeline_links with a KV budget (in blocks) per stage."""

    def __init__(self, model_path: str, ranges: list[tuple[int, int]],
                 blocks: list[int]) -> None:
        super().__init__(model_path, ranges, [
            EngineConfig(kv_memory_bytes=n * (b - a) * LAYER_BLOCK_BYTES, block_size=BLOCK)
            for (a, b), n in zip(ranges, blocks, strict=True)])

    def ask(self, requests: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
        """Run requests together; their greedy tokens (every one must finish by length)."""
        for rid, (prompt, max_tokens) in requests.items():
            self.add(rid, prompt, params(max_tokens))
        out = self.run()
        for rid in requests:
            assert out[rid][-1].finish_reason == "length", out[rid][-1]
        return {rid: [o.token_id for o in out[rid]] for rid in requests}

    def counters(self) -> list[dict[str, int]]:
        return [{"hit": e.num_prefix_hit_tokens, "prefill": e.num_prefill_tokens,
                 "recomputed": e.num_prefix_recomputed_tokens,
                 "sent": link.num_activation_bytes_sent}
                for e, link in zip(self.engines, self.links, strict=True)]


def delta(after: list[dict], before: list[dict], key: str) -> list[int]:
    return [a[key] - b[key] for a, b in zip(after, before, strict=True)]


def cached_tokens(prompt: list[int], max_tokens: int) -> int:
    """Full-block tokens of a finished request whose KV every stage computed (the last
    sampled token is never fed back)."""
    return (len(prompt) + max_tokens - 1) // BLOCK * BLOCK


def test_next_turn_reuses_the_prefix_on_every_stage(model_path, whole):
    cluster = KVCluster(model_path, [(0, 1), (1, 3), (3, 4)], [64, 64, 64])
    try:
        turn1 = random_ids(40, seed=1)
        answer1 = cluster.ask({"t1": (turn1, 8)})["t1"]
        assert answer1 == reference(whole, turn1, 8)
        cluster.settle_until(cluster.all_freed, "every stage freed")
        turn2 = turn1 + answer1 + random_ids(20, seed=2)
        before = cluster.counters()
        answer2 = cluster.ask({"t2": (turn2, 6)})["t2"]
        after = cluster.counters()
        assert answer2 == reference(whole, turn2, 6)
        hit = cached_tokens(turn1, 8)
        assert hit == 32
        assert delta(after, before, "hit") == [hit, hit, hit]
        assert delta(after, before, "prefill") == [len(turn2) - hit] * 3
        assert delta(after, before, "recomputed") == [0, 0, 0]
        # the head sent hidden states only past the prefix: prefill rest + 5 decode steps
        assert delta(after, before, "sent")[:2] == [(len(turn2) - hit + 5) * HIDDEN * 4] * 2
        cluster.settle_until(cluster.all_freed, "every stage freed")
    finally:
        cluster.close()


@pytest.mark.slow
def test_the_head_recomputes_only_what_a_later_stage_lost(model_path, whole):
    """The middle stage's small cache loses part of turn 1's prefix to other requests (the
    head and the last stage keep it): turn 2 starts where the middle stage's prefix ends, and
    the head runs its own layers again for exactly the part the middle stage lost."""
    cluster = KVCluster(model_path, [(0, 1), (1, 3), (3, 4)], [64, 12, 64])
    try:
        turn1 = random_ids(64, seed=3)
        answer1 = cluster.ask({"t1": (turn1, 8)})["t1"]
        cluster.settle_until(cluster.all_freed, "every stage freed")
        fillers = {f"f{i}": (random_ids(60, seed=10 + i), 8) for i in range(2)}
        assert cluster.ask(fillers) == {rid: reference(whole, p, n)
                                        for rid, (p, n) in fillers.items()}
        cluster.settle_until(cluster.all_freed, "every stage freed")
        turn2 = turn1 + answer1 + random_ids(12, seed=4)
        before = cluster.counters()
        answer2 = cluster.ask({"t2": (turn2, 6)})["t2"]
        after = cluster.counters()
        assert answer2 == reference(whole, turn2, 6)
        head_hit = cached_tokens(turn1, 8)
        held = delta(after, before, "hit")
        assert held[0] == held[1] == held[2] < head_hit  # the middle stage lost some blocks
        assert held[0] % BLOCK == 0
        assert delta(after, before, "recomputed")[0] == head_hit - held[0]
        assert delta(after, before, "prefill") == [len(turn2) - held[0]] * 3
    finally:
        cluster.close()


@pytest.mark.slow
def test_eviction_while_a_turn_is_in_flight(model_path, whole):
    """Other requests fill the middle stage's cache while turn 2 runs (the blocks turn 2
    pinned stay its own), and again before turn 3, whose prefix the middle stage then lost in
    part: every answer is right and the head recomputed exactly that part."""
    cluster = KVCluster(model_path, [(0, 1), (1, 3), (3, 4)], [96, 16, 96])
    try:
        turn1 = random_ids(50, seed=5)
        answer1 = cluster.ask({"t1": (turn1, 6)})["t1"]
        turn2 = turn1 + answer1 + random_ids(10, seed=6)
        requests = {"t2": (turn2, 6), "f0": (random_ids(30, seed=20), 6),
                    "f1": (random_ids(30, seed=21), 6)}
        answers = cluster.ask(requests)
        assert answers == {rid: reference(whole, p, n) for rid, (p, n) in requests.items()}
        turn3 = turn2 + answers["t2"] + random_ids(8, seed=7)
        fillers = {f"g{i}": (random_ids(60, seed=30 + i), 6) for i in range(3)}
        cluster.ask(fillers)
        before = cluster.counters()
        assert cluster.ask({"t3": (turn3, 6)})["t3"] == reference(whole, turn3, 6)
        after = cluster.counters()
        held = delta(after, before, "hit")
        head_hit = cached_tokens(turn2, 6)  # the head's cache is big enough to keep it all
        assert held[0] == held[1] == held[2] < head_hit
        assert delta(after, before, "recomputed")[0] == head_hit - held[0]
        assert delta(after, before, "prefill") == [len(turn3) - held[0]] * 3
        cluster.settle_until(cluster.all_freed, "every stage freed")
    finally:
        cluster.close()


def test_an_unanswered_query_runs_the_request_from_the_start(model_path, whole, monkeypatch):
    monkeypatch.setattr(stage_module, "PREFIX_QUERY_TIMEOUT_S", 0.3)
    cluster = KVCluster(model_path, [(0, 2), (2, 4)], [64, 64])
    try:
        turn1 = random_ids(40, seed=8)
        answer1 = cluster.ask({"t1": (turn1, 4)})["t1"]
        tail = cluster.routers[1]
        swallowed = []
        original = tail.on_message

        def lose_queries(message, hidden):
            if isinstance(message, LinkPrefixQuery):
                swallowed.append(message.rid)
                return []
            return original(message, hidden)

        tail.on_message = lose_queries
        turn2 = turn1 + answer1 + random_ids(9, seed=9)
        before = cluster.counters()
        started = time.monotonic()
        assert cluster.ask({"t2": (turn2, 4)})["t2"] == reference(whole, turn2, 4)
        after = cluster.counters()
        assert swallowed == ["t2"]
        assert time.monotonic() - started >= 0.3
        assert delta(after, before, "prefill") == [len(turn2)] * 2
        assert delta(after, before, "recomputed")[0] == cached_tokens(turn1, 4)
    finally:
        cluster.close()


def test_memory_pressure_evicts_cached_blocks_before_preempting(whole):
    """A whole-model engine whose free blocks are all cached prefixes: new requests take them
    (oldest first) and nothing running is preempted."""
    per_block = 4 * LAYER_BLOCK_BYTES
    engine = Engine(whole, EngineConfig(kv_memory_bytes=10 * per_block, block_size=BLOCK))
    first = random_ids(60, seed=40)
    engine.add_request("a", first, params(4))  # leaves 3 full cached blocks (63 tokens)
    while engine.has_work():
        engine.step()
    assert engine.num_free_blocks == 10
    # 4 blocks each at admission, a fifth once they decode past 64 tokens: the two decodes
    # must take the cached blocks of "a" (or preempt, if cached blocks were not evictable)
    others = {rid: random_ids(64, seed=41 + i) for i, rid in enumerate(["b", "c"])}
    for rid, prompt in others.items():
        engine.add_request(rid, prompt, params(10))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o.token_id)
    assert engine.batcher.num_preemptions == 0
    assert out == {rid: reference(whole, p, 10) for rid, p in others.items()}
    hits = engine.num_prefix_hit_tokens
    engine.add_request("a2", first, params(2))
    while engine.has_work():
        engine.step()
    assert engine.num_prefix_hit_tokens == hits  # its blocks went to b and c


def test_a_stage_with_sliding_window_layers_reports_no_prefix(tmp_path):
    path = save_tiny_model(tmp_path, "qwen2", sliding_window=8, use_sliding_window=True,
                           layer_types=["sliding_attention", "full_attention",
                                        "full_attention", "sliding_attention"])[0]
    tail = Engine(load_shard(path, 2, 4).model, EngineConfig(kv_memory_bytes=2**22))
    assert tail.reserve_prefix("r", list(range(1, 33))) == 0
    assert "r" not in tail.sequences


def test_prefix_messages_are_validated():
    limits = LinkLimits(hidden_size=64, max_tokens=4096, max_position=512, vocab_size=256)
    allowed = {"tcp://a:1", "tcp://b:2"}.__contains__
    good = LinkPrefixQuery("r", [1, 2, 3], ["tcp://b:2"], "tcp://a:1")
    assert prefix_problem(good, limits, allowed) is None
    assert "not in this pipeline" in prefix_problem(
        LinkPrefixQuery("r", [1], ["tcp://evil:9"], "tcp://a:1"), limits, allowed)
    assert "vocabulary" in prefix_problem(LinkPrefixQuery("r", [999], [], "tcp://a:1"),
                                          limits, allowed)
    assert prefix_problem(LinkPrefixQuery("r", [], [], "tcp://a:1"), limits, allowed)
    assert prefix_problem(LinkPrefixAnswer("r", 10_000), limits, allowed)
    assert prefix_problem(LinkPrefixAnswer("", 0), limits, allowed)
    assert decode_link(encode(good)) == good
    assert KEY  # the links of these tests carry the pipeline key (test_pipeline_links)


# ---------------------------------------------------------------- a real 2-node cluster (slow)

CHAT_TURNS = ["Name a fruit.", "What color is it?", "Where does it grow?",
              "Name another one.", "Which of the two is sweeter?", "Say goodbye."]


def health(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.slow
def test_six_turn_chat_reuses_the_prefix_on_both_stages(tmp_path_factory):
    """A 6-turn conversation through a 2-node pipeline: both stages' prefix hits grow every
    turn, greedy answers equal the whole model with caching off, turn 6 computes at most the
    tokens after the longest common full-block prefix with turn 5's tokens on each stage, and
    the head sent hidden states for exactly the tokens it computed."""
    import openai
    from test_cluster import LocalCluster, running, split_memory

    from parallax.models.hub import builtin_gguf_path
    from parallax.models.loader import load_tokenizer

    class TwoNodes(LocalCluster):
        max_replays = 1

    path = builtin_gguf_path()
    tokenizer = load_tokenizer(path)
    model = load_shard(path).model
    hidden_bytes = int(model.config.hidden_size) * 4  # float32 activations on CPU
    reference_engine = Engine(model, EngineConfig(kv_memory_bytes=64 * 2**20,
                                                  enable_prefix_caching=False),
                              eos_token_ids=[tokenizer.eos_token_id])
    cluster = TwoNodes(tmp_path_factory.mktemp("prefix_cluster"), num_nodes=2,
                       memory=split_memory())
    with running(cluster):
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", timeout=120)
        messages: list[dict] = []
        hits: list[list[int]] = []
        history: list[list[int]] = []  # per turn: prompt ids + generated ids but the last
        for turn, question in enumerate(CHAT_TURNS):
            messages.append({"role": "user", "content": question})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
            prompt = tokenizer.encode(text, add_special_tokens=False)
            reference_engine.add_request(str(turn), prompt,
                                         SamplingParams(temperature=0, max_tokens=16))
            generated: list[int] = []
            while reference_engine.has_work():
                generated += [o.token_id for o in reference_engine.step()]
            before = {port: health(port) for port in cluster.node_ports}
            answer = client.chat.completions.create(model="default", messages=messages,
                                                    temperature=0, max_tokens=16)
            after = {port: health(port) for port in cluster.node_ports}
            content = answer.choices[0].message.content
            assert content == tokenizer.decode(generated, skip_special_tokens=True)
            assert answer.usage.prompt_tokens == len(prompt)
            messages.append({"role": "assistant", "content": content})
            moved = {port: {key: after[port][key] - before[port][key] for key in (
                "num_prefix_hit_tokens", "num_prefill_tokens", "num_decode_tokens",
                "num_activation_bytes_sent")} for port in cluster.node_ports}
            hits.append([moved[p]["num_prefix_hit_tokens"] for p in cluster.node_ports])
            head = max(cluster.node_ports, key=lambda p: moved[p]["num_activation_bytes_sent"])
            computed = moved[head]["num_prefill_tokens"] + moved[head]["num_decode_tokens"]
            assert moved[head]["num_activation_bytes_sent"] == computed * hidden_bytes
            if turn == len(CHAT_TURNS) - 1:
                shared = common_prefix(history[-1], prompt) // BLOCK * BLOCK
                for port in cluster.node_ports:
                    assert moved[port]["num_prefill_tokens"] <= len(prompt) - shared
                    assert moved[port]["num_prefill_tokens"] == (
                        len(prompt) - moved[port]["num_prefix_hit_tokens"])
            history.append(prompt + generated[:-1])
        for earlier, later in zip(hits, hits[1:], strict=False):
            assert later[0] > earlier[0] and later[1] > earlier[1], hits
        assert all(h[0] == h[1] for h in hits), hits  # both stages skipped the same prefix


@pytest.mark.slow
def test_a_later_stage_that_lost_blocks_over_http(tmp_path_factory):
    """The second-stage eviction proof through a real cluster: the tail is replaced by a
    standby with a small `join --kv-memory`, a filler request pushes some of turn 1's blocks
    out of the tail's cache only (the head's holds them all), and turn 2 still equals the whole
    model's greedy answer while the head ran its own layers again for exactly what the tail
    lost."""
    import httpx
    from test_cluster import LocalCluster, running, split_memory
    from test_failover_cluster import kill_node

    from parallax.models.hub import builtin_gguf_path
    from parallax.models.loader import load_tokenizer

    class TwoNodes(LocalCluster):
        max_replays = 1

    model = load_shard(builtin_gguf_path()).model
    tokenizer = load_tokenizer(builtin_gguf_path())
    vocab = int(model.config.vocab_size)

    def whole_model(prompt: list[int], max_tokens: int) -> list[int]:
        return greedy_tokens(model, [prompt], max_tokens, kv=64 * 2**20,
                             enable_prefix_caching=False)[0]

    def ids(n: int, seed: int) -> list[int]:
        rng = random.Random(seed)
        return [rng.randrange(1000, vocab - 1000) for _ in range(n)]

    def complete(url: str, prompt: list[int], max_tokens: int) -> str:
        body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert answer["choices"][0]["finish_reason"] == "length", answer
        return answer["choices"][0]["text"]

    cluster = TwoNodes(tmp_path_factory.mktemp("evict_http"), num_nodes=2,
                       memory=split_memory())
    with running(cluster):
        head_id, old_tail_id = cluster.status()["pipelines"][0]
        # a standby with a small KV budget; the tail's death makes it the new tail (a repair
        # gives it the lost range as is, and the head keeps its own range and cache)
        tail_port = free_port()
        tail_id = old_tail_id.rsplit("-", 1)[0] + f"-{tail_port}"
        cluster.nodes[tail_port] = cluster._spawn(f"node-{tail_port}-small", [
            "join", "-s", cluster.join_target, "--port", str(tail_port), "--activation-port",
            str(free_port()), "--memory", cluster.memory, "--kv-memory", "12MB",
            "--max-batch-size", "8", "--no-warmup"])
        deadline = time.monotonic() + 240
        while tail_id not in {n["node_id"] for n in cluster.status()["node_list"]}:
            assert time.monotonic() < deadline, "the small node never joined"
            time.sleep(0.5)
        kill_node(cluster, old_tail_id)
        status: dict = {}
        while True:
            assert time.monotonic() < deadline, f"no pipeline [head, small tail]: {status}"
            try:
                status = cluster.status()
                if status["pipelines"] == [[head_id, tail_id]] and status["ready_pipelines"] \
                        and health(tail_port)["status"] == "ready":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ports = {head_id: int(head_id.rsplit("-", 1)[1]), tail_id: tail_port}
        complete(cluster.url, ids(40, seed=9), 2)  # one request through the new tail first

        turn1 = ids(150, seed=1)
        tokens1 = whole_model(turn1, 16)
        assert complete(cluster.url, turn1, 16) == tokenizer.decode(tokens1,
                                                                    skip_special_tokens=True)
        cached = cached_tokens(turn1, 16) // BLOCK  # blocks of turn 1 on every stage
        tail_blocks = health(tail_port)["num_total_blocks"]  # known once it ran a step
        assert health(ports[head_id])["num_total_blocks"] > 4 * tail_blocks
        # a filler with no common prefix that needs all but two of turn 1's blocks
        filler_blocks = tail_blocks - cached + 2
        assert filler_blocks > cached, (tail_blocks, cached, health(tail_port))
        complete(cluster.url, ids(filler_blocks * BLOCK - 8, seed=2), 8)
        turn2 = turn1 + tokens1 + ids(12, seed=3)
        before = {n: health(p) for n, p in ports.items()}
        answer2 = complete(cluster.url, turn2, 6)
        after = {n: health(p) for n, p in ports.items()}
    moved = {n: {k: after[n][k] - before[n][k] for k in (
        "num_prefix_hit_tokens", "num_prefill_tokens", "num_prefix_recomputed_tokens")}
        for n in ports}
    assert answer2 == tokenizer.decode(whole_model(turn2, 6), skip_special_tokens=True)
    head_cached = cached * BLOCK
    held = moved[tail_id]["num_prefix_hit_tokens"]
    assert 0 < held < head_cached and held % BLOCK == 0, (moved, tail_blocks, before, after)
    assert moved[head_id]["num_prefix_hit_tokens"] == held, moved
    assert moved[head_id]["num_prefix_recomputed_tokens"] == head_cached - held, moved
    assert moved[head_id]["num_prefill_tokens"] == moved[tail_id]["num_prefill_tokens"] \
        == len(turn2) - held, moved
