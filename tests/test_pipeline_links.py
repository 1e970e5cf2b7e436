"""Three engines joined by real ZeroMQ tcp links on loopback, driven in one process.

The links carry the pipeline's link key, as the scheduler hands it out (link_auth.py)."""

from __future__ import annotations

import time

import pytest
import torch
import zmq
from processes import free_port
from tiny_models import greedy_tokens, save_tiny_model

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models.loader import load_shard
from parallax.node.link_auth import LinkSecurity
from parallax.node.links import LinkLimits, PipelineLinks
from parallax.node.stage import StageRouter
from parallax.node.tracing import StageTracer, split_records
from parallax.protocol.common import TokenOutput
from parallax.protocol.ipc import AddRequest

PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
KEY = bytes(range(32))


def keyed_links(context: zmq.Context, endpoints: list[str], engines: list[Engine],
                key: bytes = KEY) -> list[PipelineLinks]:
    """One PipelineLinks per engine, bound to its endpoint, all holding the pipeline's key."""
    return [PipelineLinks(context, e, e, LinkLimits.of(engine), LinkSecurity(key, endpoints))
            for e, engine in zip(endpoints, engines, strict=True)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("links"), "llama")[0]


class Cluster:
    """One engine per layer range, each behind a StageRouter, joined by real loopback links.

    `configs`: each stage's EngineConfig (default: 4 MiB of KV each)."""

    def __init__(self, model_path: str, ranges: list[tuple[int, int]],
                 configs: list[EngineConfig] | None = None) -> None:
        self.context = zmq.Context()
        self.endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in ranges]
        configs = configs or [EngineConfig(kv_memory_bytes=2**22)] * len(ranges)
        self.engines = [Engine(load_shard(model_path, a, b).model, config)
                        for (a, b), config in zip(ranges, configs, strict=True)]
        self.links = keyed_links(self.context, self.endpoints, self.engines)
        self.routers = [StageRouter(e, link) for e, link in zip(self.engines, self.links,
                                                                   strict=True)]
        self.alive = [True] * len(ranges)

    def add(self, rid: str, prompt: list[int], params: SamplingParams = PARAMS) -> None:
        self.routers[0].add_request(AddRequest(rid, prompt, params, self.endpoints[1:]))

    def kill(self, index: int) -> None:
        self.alive[index] = False
        self.links[index].close()

    def run(self, until_s: float = 20.0) -> dict[str, list[TokenOutput]]:
        """Drive every stage until all head requests finished; head frontend outputs by rid."""
        out: dict[str, list[TokenOutput]] = {}
        open_rids = set(self.engines[0].sequences)
        deadline = time.monotonic() + until_s
        while open_rids and time.monotonic() < deadline:
            for index, (router, engine) in enumerate(zip(self.routers, self.engines,
                                                         strict=True)):
                if not self.alive[index]:
                    continue
                produced = []
                while (received := router.links.receive()) is not None:
                    produced += router.on_message(*received)
                if engine.has_work():
                    produced += router.after_step(engine.step())
                produced += router.check_peers()
                if index == 0:
                    for o in produced:
                        out.setdefault(o.rid, []).append(o)
                        if o.finished:
                            open_rids.discard(o.rid)
            time.sleep(0.001)
        return out

    def settle(self, seconds: float = 0.5) -> None:
        """Keep every live stage receiving and stepping for a while (releases in flight)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for index, (router, engine) in enumerate(zip(self.routers, self.engines,
                                                         strict=True)):
                if not self.alive[index]:
                    continue
                while (received := router.links.receive()) is not None:
                    router.on_message(*received)
                if engine.has_work():
                    router.after_step(engine.step())
                router.links.flush()  # messages to a peer still connecting
            time.sleep(0.005)

    def close(self) -> None:
        for index, link in enumerate(self.links):
            if self.alive[index]:
                link.close()
        self.context.term()


def pipeline_greedy_tokens(model_path: str, ranges: list[tuple[int, int]],
                           configs: list[EngineConfig], prompts: list[list[int]],
                           max_tokens: int) -> tuple[list[list[int]], list[Engine]]:
    """Greedy tokens of prompts run together through a Cluster, and its engines."""
    cluster = Cluster(model_path, ranges, configs)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    try:
        for i, prompt in enumerate(prompts):
            cluster.add(str(i), prompt, params)
        out = cluster.run(until_s=120.0)
    finally:
        cluster.close()
    tokens = [[o.token_id for o in out.get(str(i), [])] for i in range(len(prompts))]
    return tokens, cluster.engines


def test_three_stage_pipeline_equals_single_engine_and_frees_blocks(model_path):
    prompts = [[5, 6, 7], [9] * 20, list(range(1, 41))]
    expected = greedy_tokens(load_shard(model_path).model, prompts, max_tokens=10)
    cluster = Cluster(model_path, [(0, 1), (1, 3), (3, 4)])
    try:
        for i, prompt in enumerate(prompts):
            cluster.add(str(i), prompt)
        out = cluster.run()
        tokens = [[o.token_id for o in out[str(i)]] for i in range(3)]
        assert tokens == expected
        assert all(out[str(i)][-1].finish_reason == "length" for i in range(3))
        cluster.settle()  # let the releases travel
        for engine in cluster.engines:
            assert engine.num_free_blocks == engine.num_total_blocks
            assert not engine.sequences
    finally:
        cluster.close()


def test_the_head_gets_every_stage_trace_record_in_order_and_none_is_left(model_path):
    ranges = [(0, 1), (1, 3), (3, 4)]
    cluster = Cluster(model_path, ranges)
    for router, (start, end) in zip(cluster.routers, ranges, strict=True):
        router.tracer = StageTracer(start, end)
    try:
        cluster.add("t", [5, 6, 7, 8])
        cluster.routers[0].tracer.ready("t")  # as the executor does on AddRequest
        final = cluster.run()["t"][-1]
        assert final.finished
        records = split_records(final.trace)
        assert [(r["start_layer"], r["end_layer"]) for r in records] == ranges
        # the head's 10 activation messages (the prompt's 4 tokens, then one per token) were
        # acked by the next stage; the last ack may come after the last token
        engine = cluster.engines[0]
        row_bytes = engine.model.config.hidden_size * torch.empty(
            0, dtype=engine.config.dtype).element_size()
        hops = int(records[0]["hops"])
        assert hops in (9, 10) and records[0]["hop_bytes"] == (4 + hops - 1) * row_bytes
        assert records[1]["hops"] >= 8 and records[2]["hops"] >= 8  # tokens back to the head
        assert all(r["hop_ms"] >= 0 for r in records)
        cluster.settle()
        for router in cluster.routers:  # every stage forgot the request and its sends
            assert router.tracer.records == {} and router.tracer.unacked == {}
    finally:
        cluster.close()


def test_abort_at_head_releases_every_stage(model_path):
    cluster = Cluster(model_path, [(0, 2), (2, 4)])
    try:
        cluster.add("a", list(range(1, 30)),
                    SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        for _ in range(3):
            cluster.run(until_s=0.05)
        cluster.routers[0].abort(["a"])
        cluster.settle()
        assert all(not e.sequences for e in cluster.engines)
        assert all(e.num_free_blocks == e.num_total_blocks for e in cluster.engines)
    finally:
        cluster.close()


def test_dead_middle_stage_fails_requests_quickly(model_path):
    cluster = Cluster(model_path, [(0, 1), (1, 3), (3, 4)])
    try:
        cluster.add("x", list(range(1, 12)),
                    SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        cluster.run(until_s=0.2)
        assert "x" in cluster.engines[0].sequences  # still decoding when the stage dies
        cluster.kill(1)
        started = time.monotonic()
        out = cluster.run(until_s=8.0)
        assert out["x"][-1].finish_reason == "error"
        assert "next stage" in out["x"][-1].error
        assert time.monotonic() - started < 5.0
        assert not cluster.engines[0].sequences
        cluster.settle()  # the head's release reaches the tail past the dead middle
        assert not cluster.engines[2].sequences
        assert cluster.engines[2].num_free_blocks == cluster.engines[2].num_total_blocks
    finally:
        cluster.close()


def test_dead_head_leaves_nothing_behind_once_the_pipeline_is_rebuilt(model_path):
    """The tail holds requests of a head that died; once the scheduler hands it a pipeline
    without that head, it frees them (their KV and running slots would otherwise leak)."""
    cluster = Cluster(model_path, [(0, 2), (2, 4)])
    try:
        cluster.add("h", list(range(1, 20)),
                    SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        cluster.run(until_s=0.2)
        cluster.kill(0)
        cluster.settle(0.2)
        tail = cluster.engines[1]
        assert "h" in tail.sequences  # nothing tells the tail yet
        replacement = f"tcp://127.0.0.1:{free_port()}"
        cluster.links[1].set_security(KEY, [replacement, cluster.endpoints[1]])
        assert cluster.routers[1].drop_orphans() == []  # nobody to report to
        assert not tail.sequences
        assert tail.num_free_blocks == tail.num_total_blocks
    finally:
        cluster.close()
