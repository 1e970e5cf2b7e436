"""Three engines joined by real ZeroMQ tcp links on loopback, driven in one process.

The links carry the pipeline's link key, as the scheduler hands it out (link_auth.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

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
SETTLE_TIMEOUT_S = 20.0  # loopback releases take milliseconds; this is a loaded CI machine's


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

    def run_until(self, condition: Callable[[], bool], what: str,
                  timeout: float = SETTLE_TIMEOUT_S) -> None:
        """`run` in short slices until `condition()` holds; fail naming `what` after
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} after {timeout} s")
            self.run(until_s=0.02)

    def holds(self, rid: str, indexes: list[int]) -> bool:
        """Every stage of `indexes` holds request `rid`."""
        return all(rid in self.engines[i].sequences for i in indexes)

    def settle_until(self, condition: Callable[[], bool], what: str,
                     timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Keep every live stage receiving and stepping (releases and acks in flight) until
        `condition()` holds; fail naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} after {timeout} s")
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

    def settle_for(self, seconds: float) -> None:
        """Drive every live stage for `seconds` (to show that something does NOT happen)."""
        deadline = time.monotonic() + seconds
        self.settle_until(lambda: time.monotonic() > deadline, "done", seconds + 1)

    def all_freed(self, indexes: list[int] | None = None) -> bool:
        """No stage (of `indexes`) holds a request or a KV block."""
        engines = [self.engines[i] for i in indexes or range(len(self.engines))]
        return all(not e.sequences and e.num_free_blocks == e.num_total_blocks
                   for e in engines)

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


@pytest.mark.slow
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
        cluster.settle_until(cluster.all_freed, "every stage freed")  # releases travel
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
        # the head's 10 activation messages (the prompt's 4 tokens, then one per token) are
        # acked by the next stage in order; how many acks beat the last token depends on load
        engine = cluster.engines[0]
        row_bytes = engine.model.config.hidden_size * torch.empty(
            0, dtype=engine.config.dtype).element_size()
        hops = int(records[0]["hops"])
        assert 1 <= hops <= 10 and records[0]["hop_bytes"] == (4 + hops - 1) * row_bytes
        assert all(1 <= r["hops"] <= 10 and r["hop_ms"] >= 0 for r in records)
        # every send of every stage is acked in the end, and every stage forgets the request
        cluster.settle_until(lambda: all(not r.tracer.records and not r.tracer.unacked
                                         for r in cluster.routers), "every record released")
        # 10 activations from the head and from the middle, 10 tokens back from the tail
        assert [len(r.tracer.link_samples) for r in cluster.routers] == [10, 10, 10]
    finally:
        cluster.close()


def test_abort_at_head_releases_every_stage(model_path):
    cluster = Cluster(model_path, [(0, 2), (2, 4)])
    try:
        cluster.add("a", list(range(1, 30)),
                    SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        cluster.run_until(lambda: cluster.holds("a", [0, 1]), "decoding on every stage")
        cluster.routers[0].abort(["a"])
        cluster.settle_until(cluster.all_freed, "every stage freed")
    finally:
        cluster.close()


def test_dead_middle_stage_fails_requests_quickly(model_path):
    cluster = Cluster(model_path, [(0, 1), (1, 3), (3, 4)])
    try:
        cluster.add("x", list(range(1, 12)),
                    SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        cluster.run_until(lambda: cluster.holds("x", [0, 1, 2]), "decoding on every stage")
        cluster.kill(1)
        started = time.monotonic()
        out = cluster.run(until_s=8.0)
        assert out["x"][-1].finish_reason == "error"
        assert "next stage" in out["x"][-1].error
        assert time.monotonic() - started < 5.0
        assert not cluster.engines[0].sequences
        # the head's release reaches the tail past the dead middle
        cluster.settle_until(lambda: cluster.all_freed([2]), "the tail freed")
    finally:
        cluster.close()


def test_dead_head_leaves_nothing_behind_once_the_pipeline_is_rebuilt(model_path):
    """The tail holds requests of a head that died; once the scheduler hands it a pipeline
    without that head, it frees them (their KV and running slots would otherwise leak)."""
    cluster = Cluster(model_path, [(0, 2), (2, 4)])
    try:
        cluster.add("h", list(range(1, 20)),
                    SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        cluster.run_until(lambda: cluster.holds("h", [0, 1]), "decoding on every stage")
        cluster.kill(0)
        cluster.settle_for(0.2)
        tail = cluster.engines[1]
        assert "h" in tail.sequences  # nothing tells the tail yet
        replacement = f"tcp://127.0.0.1:{free_port()}"
        cluster.links[1].set_security(KEY, [replacement, cluster.endpoints[1]])
        assert cluster.routers[1].drop_orphans() == []  # nobody to report to
        assert not tail.sequences
        assert tail.num_free_blocks == tail.num_total_blocks
    finally:
        cluster.close()
