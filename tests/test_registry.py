"""Scheduler registry rules without sockets: rejoin replaces, eviction, readiness, status."""

from __future__ import annotations

from parallax.scheduler.allocation import ModelSpec, NodeInfo
from parallax.scheduler.registry import NodeRecord, Registry

MB = 2**20
MODEL = ModelSpec("m", num_layers=30, layer_bytes=10 * MB, embedding_bytes=30 * MB,
                  lm_head_bytes=30 * MB, kv_bytes_per_token_per_layer=0)


def record(node_id: str, memory_mb: int, now: float = 0.0) -> NodeRecord:
    info = NodeInfo(node_id, memory_mb * MB, gflops=100.0, bandwidth_gbps=10.0, joined_at=now)
    return NodeRecord(node_id, info, "cpu", "test cpu", f"http://127.0.0.1/{node_id}",
                      f"tcp://127.0.0.1:1/{node_id}", joined_at=now, last_seen=now)


def test_waits_for_init_nodes_then_allocates_and_rejoin_replaces():
    registry = Registry(init_nodes_num=2)
    registry.set_model(MODEL)
    registry.join(record("a", 250))
    assert registry.allocation is None and registry.status() == "waiting"
    registry.join(record("b", 250))
    assert registry.allocation is not None and len(registry.allocation.pipelines) == 1
    assert registry.status() == "rebalancing"  # allocated but nothing loaded yet
    generation = registry.generation
    registry.join(record("a", 250, now=5.0))  # restarted node, same identity
    assert sorted(registry.nodes) == ["a", "b"]
    assert registry.generation == generation  # same pipeline: nothing moves


def test_ready_only_when_every_stage_loaded_its_range():
    registry = Registry(init_nodes_num=2)
    registry.set_model(MODEL)
    registry.join(record("a", 250))
    registry.join(record("b", 250))
    ranges = {n: registry.assignment(n) for n in ("a", "b")}
    assert sorted(ranges.values())[0][0] == 0 and sorted(ranges.values())[-1][1] == 30
    registry.heartbeat("a", 1.0, loaded_model="m", loaded_range=ranges["a"])
    assert registry.ready_pipelines() == []
    registry.heartbeat("b", 1.0, loaded_model="m", loaded_range=(0, 1))  # stale range
    assert registry.ready_pipelines() == []
    registry.heartbeat("b", 1.0, loaded_model="m", loaded_range=ranges["b"])
    assert registry.ready_pipelines() == [0] and registry.status() == "available"


def test_silent_node_is_evicted_and_unknown_heartbeat_asks_rejoin():
    registry = Registry(heartbeat_timeout_s=10, init_nodes_num=1)
    registry.set_model(MODEL)
    registry.join(record("a", 1000))
    registry.join(record("b", 1000))
    registry.heartbeat("a", 8.0)
    assert registry.evict_silent(now=12.0) == ["b"]
    assert list(registry.nodes) == ["a"]
    assert registry.heartbeat("b", 13.0) is False
    assert registry.allocation.stage_of("b") is None


def test_leave_reallocates_and_model_switch_clears():
    registry = Registry(init_nodes_num=1)
    registry.set_model(MODEL)
    for name in "abcd":
        registry.join(record(name, 250))
    assert len(registry.allocation.pipelines) == 2
    assert registry.leave("c") and not registry.leave("c")
    assert len(registry.allocation.pipelines) == 1
    assert "c" not in registry.nodes and registry.allocation.stage_of("c") is None
    (pipeline,) = registry.allocation.pipelines  # the survivors still cover every layer
    assert {s.node_id for s in pipeline} <= set("abd")
    assert pipeline[0].start_layer == 0 and pipeline[-1].end_layer == 30
    assert all(a.end_layer == b.start_layer for a, b in zip(pipeline[:-1], pipeline[1:], strict=True))
    registry.set_model(None)
    assert registry.allocation is None and registry.status() == "waiting"


def test_status_says_rebalancing_while_a_second_pipeline_loads_beside_a_serving_one():
    from parallax.scheduler.status import cluster_status

    registry = Registry(init_nodes_num=1)
    registry.set_model(MODEL)
    registry.join(record("a", 1000))
    registry.heartbeat("a", 1.0, loaded_model="m", loaded_range=registry.assignment("a"))
    data = cluster_status(registry, node_join_command="")["data"]
    assert data["status"] == "available" and data["rebalancing"] is False
    registry.join(record("b", 1000))  # a whole-model node: a second pipeline, not loaded yet
    assert len(registry.allocation.pipelines) == 2
    assert registry.assignment("a") == (0, 30)  # the serving pipeline is kept as it is
    data = cluster_status(registry, node_join_command="")["data"]
    assert data["status"] == "available" and data["rebalancing"] is True
    registry.heartbeat("b", 2.0, loaded_model="m", loaded_range=registry.assignment("b"))
    assert cluster_status(registry, node_join_command="")["data"]["rebalancing"] is False
