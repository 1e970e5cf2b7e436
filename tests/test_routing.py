"""Routing: pipelines + load + latency → one pipeline, all_busy or no_pipeline (pure)."""

from __future__ import annotations

import pytest

from parallax.config import ConfigError, SchedulerConfig
from parallax.scheduler.allocation import Stage
from parallax.scheduler.routing import NodeLoad, pipeline_cost_ms, route


def two_stage(a: str, b: str, split: int = 16, total: int = 32) -> tuple[Stage, ...]:
    return (Stage(a, 0, split), Stage(b, split, total))


def load(
    node_id: str,
    running: int = 0,
    waiting: int = 0,
    cap: int = 8,
    latency: float = 1.0,
    alive: bool = True,
) -> NodeLoad:
    return NodeLoad(node_id, running, waiting, cap, latency, alive)


PIPELINES = [two_stage("a", "b"), two_stage("c", "d"), two_stage("e", "f")]


def idle(*ids: str) -> dict[str, NodeLoad]:
    return {i: load(i) for i in ids}


def test_skips_full_pipelines() -> None:
    loads = idle("a", "b", "c", "d", "e", "f")
    loads["a"] = load("a", running=6, waiting=2)  # 8 of 8: at capacity
    loads["e"] = load("e", running=8)
    decision = route(PIPELINES, loads)
    assert decision.reason == "ok" and decision.pipeline_index == 1


def test_all_busy_when_every_complete_pipeline_is_full() -> None:
    loads = idle("a", "b", "c", "d")
    loads["b"] = load("b", running=8)
    loads["c"] = load("c", waiting=8)
    decision = route(PIPELINES, loads)  # e, f missing: that pipeline is not complete
    assert decision.reason == "all_busy" and decision.pipeline_index is None


def test_no_pipeline_when_none_is_complete() -> None:
    loads = idle("a", "c", "d", "e", "f")
    loads["d"] = load("d", alive=False)
    loads["e"] = load("e", alive=False)
    assert route(PIPELINES, loads) == route(PIPELINES, loads)
    decision = route(PIPELINES, loads)
    assert decision.reason == "no_pipeline" and decision.pipeline_index is None
    assert route([], {}).reason == "no_pipeline"
    # a dead node in an otherwise full pipeline does not turn no_pipeline into all_busy
    loads["b"] = load("b", running=8)
    assert route(PIPELINES, loads).reason == "all_busy"


def test_prefers_lower_latency() -> None:
    loads = idle("a", "b", "c", "d", "e", "f")
    loads["a"] = load("a", latency=3.0)
    loads["f"] = load("f", latency=2.0)
    for last in (-1, 0, 1, 2):
        assert route(PIPELINES, loads, last_index=last).pipeline_index == 1


def test_load_raises_cost() -> None:
    loads = idle("a", "b", "c", "d")
    loads["a"] = load("a", running=4)
    decision = route(PIPELINES[:2], loads)
    assert decision.pipeline_index == 1
    assert pipeline_cost_ms(PIPELINES[0], loads) > pipeline_cost_ms(PIPELINES[1], loads)


def test_link_latency_counts_including_the_way_back() -> None:
    loads = idle("a", "b", "c", "d")
    links = {("a", "b"): 5.0, ("d", "c"): 3.0}
    assert route(PIPELINES[:2], loads, link_latency_ms=links).pipeline_index == 1
    base = pipeline_cost_ms(PIPELINES[0], loads)
    # a→b forward plus b→a back, both read from the one measured direction
    assert pipeline_cost_ms(PIPELINES[0], loads, links) == pytest.approx(base + 10.0)


def test_layers_weigh_latency() -> None:
    loads = {
        "a": load("a", latency=1.0),
        "b": load("b", latency=4.0),
        "c": load("c", latency=1.0),
        "d": load("d", latency=4.0),
    }
    skewed = [two_stage("a", "b", split=24), two_stage("c", "d", split=8)]
    for last in (-1, 0, 1):  # fewer layers on the slow node, whatever the round-robin position
        assert route(skewed, loads, last_index=last).pipeline_index == 0


def test_round_robin_among_equals() -> None:
    loads = idle("a", "b", "c", "d", "e", "f")
    picks, last = [], -1
    for _ in range(7):
        last = route(PIPELINES, loads, last_index=last).pipeline_index
        picks.append(last)
    assert picks == [0, 1, 2, 0, 1, 2, 0]
    # only the tied-best rotate; a slower pipeline is never picked
    loads["c"] = load("c", latency=2.0)
    picks = [route(PIPELINES, loads, last_index=i).pipeline_index for i in (-1, 0, 1, 2)]
    assert picks == [0, 2, 2, 0]


def test_unknown_latency_uses_the_cluster_mean() -> None:
    loads = {
        "a": load("a", latency=0.0),
        "b": load("b", latency=0.0),
        "c": load("c", latency=2.5),
        "d": load("d", latency=2.5),
        "e": load("e", latency=1.5),
        "f": load("f", latency=1.5),
    }
    # a and b count as 2 ms per layer (mean of the known ones): 64 ms against 80 ms
    assert route(PIPELINES[:2], loads).pipeline_index == 0
    # and their load still counts: 16·2·(1 + 7/8) + 32 = 92 ms > 80 ms
    loads["a"] = load("a", latency=0.0, running=7)
    assert route(PIPELINES[:2], loads).pipeline_index == 1


def test_retry_defaults_follow_the_contract() -> None:
    # all pipelines busy: retried 20 times, 5 s apart (SchedulerConfig is the one home)
    config = SchedulerConfig()
    assert (config.retry_attempts, config.retry_interval_s) == (20, 5.0)
    with pytest.raises(ConfigError, match="retry_attempts"):
        SchedulerConfig(retry_attempts=-1)


# ---------------------------------------------------------------- cache-aware routing (issue 15)


def test_a_conversation_goes_back_to_the_pipeline_holding_its_prefix() -> None:
    loads = idle("a", "b", "c", "d", "e", "f")
    assert route(PIPELINES, loads, last_index=0).pipeline_index == 1  # round-robin
    assert route(PIPELINES, loads, last_index=0, preferred=2).pipeline_index == 2
    loads["e"] = load("e", running=3)  # a little busier: the cached prefix is worth more
    assert route(PIPELINES, loads, preferred=2).pipeline_index == 2


def test_a_much_busier_preferred_pipeline_is_passed_over() -> None:
    loads = idle("a", "b", "c", "d", "e", "f")
    loads["e"] = load("e", running=7)
    loads["f"] = load("f", running=7)  # cost 1.875x an idle pipeline's
    assert route(PIPELINES, loads, preferred=2).pipeline_index == 0
    assert route(PIPELINES, loads, preferred=2, affinity_cost_ratio=2.0).pipeline_index == 2
    loads["e"] = load("e", running=8)  # at capacity: never
    assert route(PIPELINES, loads, preferred=2, affinity_cost_ratio=9.0).pipeline_index == 0
    dead = {**idle("a", "b", "c", "d", "e"), "f": load("f", alive=False)}
    assert route(PIPELINES, dead, preferred=2).pipeline_index in (0, 1)


def test_conversation_keys_chain_the_messages() -> None:
    from parallax.scheduler.routing import conversation_keys

    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}]
    keys1, keys2 = conversation_keys(turn1), conversation_keys(turn2)
    assert len(keys2) == 4 and keys2[:2] == keys1
    assert conversation_keys([{"content": "Be brief.", "role": "system"}])[0] == keys1[0]
    other = conversation_keys([{"role": "system", "content": "Be brief!"}, turn1[1]])
    assert other[0] != keys1[0] and other[1] != keys1[1]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert conversation_keys(parts) != conversation_keys([turn1[1]])
    assert conversation_keys("not a list") == [] and conversation_keys(None) == []


def test_affinity_finds_the_longest_remembered_history_and_stays_bounded() -> None:
    from parallax.scheduler.affinity import PrefixAffinity
    from parallax.scheduler.routing import conversation_keys

    pipelines = [["a", "b"], ["c", "d"]]
    affinity = PrefixAffinity(max_entries=2)
    chat = [{"role": "user", "content": "Hi"}]
    affinity.remember(conversation_keys(chat), ("c", "d"))
    chat2 = [*chat, {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "?"}]
    assert affinity.preferred(conversation_keys(chat2), pipelines) == 1
    assert affinity.preferred(conversation_keys([{"role": "user", "content": "Yo"}]),
                              pipelines) is None
    assert affinity.preferred(conversation_keys(chat2), [["a", "b"], ["c", "e"]]) is None
    for n in range(3):  # the oldest conversation is forgotten
        affinity.remember(conversation_keys([{"role": "user", "content": str(n)}]), ("a", "b"))
    assert len(affinity) == 2
    assert affinity.preferred(conversation_keys(chat2), pipelines) is None
