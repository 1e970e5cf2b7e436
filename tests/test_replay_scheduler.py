"""Replay on failure through the real scheduler app, with scripted fake heads (no model).

A fake head streams tokens `t0 t1 ...` (TOTAL of them) with their ids on the internal leg; the
user message scripts how the first attempt breaks. A replayed attempt (resume ids in the body)
continues after the ids it was given, as a real head does, so the client's text must come out
whole: `t0 ... t5`, no error, one role chunk, one id.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from test_scheduler_app import WHOLE, FakeNodes, Scheduler, in_thread, sse_events, wait_until

from parallax.scheduler.failover import PROBE_TIMEOUT_S
from parallax.serving.errors import error_body
from parallax.serving.sse import DONE, encode_event

TOTAL = 6
FULL = "".join(f"t{i} " for i in range(TOTAL))


class ScriptedHeads(FakeNodes):
    """Fake heads that speak the internal leg (parallax/serving/internal_leg.py)."""

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            node_id = self.node_of_port[request.scope["server"][1]]
            body = await request.json()
            self.received.append((node_id, body))
            script = body["messages"][-1]["content"].split()
            if script[0] == "REFUSE" and body.get("parallax", {}).get("resume_token_ids"):
                return JSONResponse(error_body(400, "no such replay"), status_code=400)
            return StreamingResponse(self._script(node_id, body, script),
                                     media_type="text/event-stream")

        return app

    async def _script(self, node_id: str, body: dict, script: list[str]):
        rid = body["rid"]
        internal = body.get("parallax") or {}
        resume = internal.get("resume_token_ids") or []
        finished = False

        def chunk(delta: dict, finish: str | None = None, ids: list[int] | None = None,
                  **extra: Any) -> bytes:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": 100 + len(resume),
                   "model": "test-model",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": count,
                             "total_tokens": 3 + count}, **extra}
            if internal.get("internal"):
                obj["parallax"] = {"token_ids": ids or []}
            return encode_event(obj)

        def fail(kind: str, blame: bool) -> list[bytes]:
            error = error_body(503, f"scripted {kind}")
            # BLAME names this head's own endpoint, BLAME=<id> another node's
            named = next((w.split("=", 1)[1] for w in script if w.startswith("BLAME=")),
                         node_id)
            error["parallax"] = {"kind": kind,
                                 "peer": f"tcp://{named}.test:5000" if blame else None}
            return [chunk({}, "error", metrics={"ttft_ms": 1.0}), encode_event(error), DONE]

        count = len(resume)
        try:
            yield chunk({"role": "assistant", "content": ""})
            first = not resume
            mode = script[0]
            stop_at = int(script[1]) if len(script) > 1 and script[1].isdigit() else 1
            for i in range(len(resume), TOTAL):
                if (first or mode == "POISON") and i - len(resume) == stop_at and mode != "OK":
                    if mode in ("FAIL", "POISON", "REFUSE"):
                        kind = script[2] if len(script) > 2 else "engine_error"
                        for data in fail(kind, any(w.startswith("BLAME") for w in script)):
                            yield data
                        finished = True
                        return
                    if mode == "STALL":
                        for _ in range(1000):  # 10 s unless the scheduler hangs up
                            await asyncio.sleep(0.01)
                    if mode == "DROP":
                        raise RuntimeError("the fake head dies mid-stream")
                count += 1
                yield chunk({"content": f"t{i} "}, ids=[i])
                await asyncio.sleep(0.01)
            yield chunk({}, "length", metrics={"ttft_ms": 1.0, "tps": 2.0, "duration_ms": 3.0})
            yield DONE
            finished = True
        finally:
            if not finished:
                self.cancelled.append(rid)


@pytest.fixture
def heads():
    fake = ScriptedHeads()
    yield fake
    fake.server.stop()


@pytest.fixture
def scheduler(heads):
    started: list[Scheduler] = []

    def start(**kwargs: Any) -> Scheduler:
        settings = {"replay_keepalive_s": 0.1, "replay_wait_s": 5.0, **kwargs}
        started.append(Scheduler(heads, **settings))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def chunks_of(events: list) -> list[dict]:
    return [e for e in events if isinstance(e, dict) and e.get("object") ==
            "chat.completion.chunk"]


def text_of(events: list) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks_of(events))


def assert_one_clean_stream(events: list) -> dict:
    """One id, one role chunk, no internal field, no error; returns the final chunk."""
    chunks = chunks_of(events)
    assert events[-1] == "[DONE]" and not [e for e in events if isinstance(e, dict)
                                           and e.get("object") == "error"]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert sum("role" in c["choices"][0]["delta"] for c in chunks) == 1
    assert all("parallax" not in c for c in chunks)
    assert text_of(events) == FULL
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == TOTAL
    return final


def test_a_broken_pipeline_is_continued_on_another(scheduler, heads):
    s = scheduler()
    s.bring_up({"a": WHOLE, "b": WHOLE})
    response = s.chat("FAIL 3 peer_lost BLAME")
    final = assert_one_clean_stream(sse_events(response))
    metrics = final["metrics"]
    assert metrics["failovers"] == 1 and metrics["replayed_tokens"] == 3
    assert metrics["replay_ms"] >= 0 and metrics["duration_ms"] >= metrics["ttft_ms"]
    (first_head, first), (second_head, second) = heads.received
    assert first_head != second_head  # the blamed node is avoided
    assert second["parallax"]["resume_token_ids"] == [0, 1, 2]
    assert first["rid"] != second["rid"] and second["stream"] is True
    assert "parallax" not in response.text  # stripped, errors included
    # its trace (the operator's: a loopback client of a scheduler without an API key) lists
    # both attempts, the broken one with its failure kind
    trace = wait_for_trace(s, final["id"])
    assert trace["failovers"] == 1 and trace["finish_reason"] == "length"
    broken, done = trace["attempts"]
    assert (broken["rid"], broken["pipeline"], broken["outcome"]) == (
        first["rid"], [first_head], "peer_lost")
    assert (done["rid"], done["pipeline"], done["outcome"]) == (second["rid"], [second_head], "ok")


def wait_for_trace(s, request_id: str) -> dict:
    """GET /v1/traces/{id} once the scheduler stored it (just after the stream's end)."""
    deadline = time.monotonic() + 5
    while True:
        response = s.http.get(f"/v1/traces/{request_id}")
        if response.status_code != 404 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return response.json()
        time.sleep(0.05)


def test_non_streaming_requests_are_replayed_too(scheduler, heads):
    s = scheduler()
    s.bring_up({"a": WHOLE, "b": WHOLE})
    response = s.chat("FAIL 2 stage_timeout BLAME", stream=False)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == FULL
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["metrics"]["failovers"] == 1 and body["usage"]["completion_tokens"] == TOTAL
    assert all(b["stream"] is True for _, b in heads.received)


def test_a_head_that_drops_its_connection_is_replayed_elsewhere(scheduler, heads):
    s = scheduler()
    s.bring_up({"a": WHOLE, "b": WHOLE})
    events = sse_events(s.chat("DROP 2"))
    assert_one_clean_stream(events)
    assert [h for h, _ in heads.received][0] != [h for h, _ in heads.received][1]


def test_poison_request_is_replayed_at_most_n_times_then_fails(scheduler, heads):
    s = scheduler(max_replays=2)
    s.bring_up({"a": WHOLE})
    started = time.monotonic()
    events = sse_events(s.chat("POISON 1 engine_error"))
    assert time.monotonic() - started < 5
    assert len(heads.received) == 3  # the first attempt and two replays
    assert events[-1] == "[DONE]" and events[-2]["object"] == "error"
    assert "parallax" not in events[-2]
    final = chunks_of(events)[-1]
    assert final["choices"][0]["finish_reason"] == "error" and final["metrics"]["failovers"] == 2
    assert text_of(events) == "t0 t1 t2 "  # one token per attempt, each continued
    assert s.status()["node_list"][0]["running_requests"] == 0


def test_a_request_the_node_rejects_as_invalid_is_never_replayed(scheduler, heads):
    s = scheduler()
    s.bring_up({"a": WHOLE, "b": WHOLE})
    events = sse_events(s.chat("FAIL 2 invalid_request"))
    assert len(heads.received) == 1
    assert events[-2]["object"] == "error" and events[-1] == "[DONE]"
    response = s.chat("FAIL 2 invalid_request", stream=False)
    assert response.status_code == 503 and response.json()["object"] == "error"


def test_a_head_refusing_the_replay_ends_the_stream_with_its_error(scheduler, heads):
    s = scheduler()
    s.bring_up({"a": WHOLE})
    events = sse_events(s.chat("REFUSE 2 engine_error"))
    assert events[-2]["object"] == "error" and events[-2]["code"] == 400
    assert len(heads.received) == 2


def test_keepalives_while_no_pipeline_then_the_error_after_the_bound(scheduler, heads):
    s = scheduler(replay_wait_s=1.0)
    s.bring_up({"a": WHOLE})
    started = time.monotonic()
    response = s.chat("FAIL 2 peer_lost BLAME")  # a is suspect: no pipeline to go on with
    assert 1.0 <= time.monotonic() - started < 4
    assert ": keep-alive" in response.text
    events = sse_events(response)
    assert events[-2]["object"] == "error" and "within 1 s" in events[-2]["message"]
    assert text_of(events) == "t0 t1 "
    # the stream still ends as the contract says: a final chunk with finish_reason "error"
    final = chunks_of(events)[-1]
    assert final["choices"][0]["finish_reason"] == "error" and final["metrics"]["failovers"] == 1
    assert final["id"] == chunks_of(events)[0]["id"]


def test_a_stalled_stream_ends_with_an_error_chunk_when_replays_are_off(scheduler, heads):
    s = scheduler(max_replays=0)
    s.bring_up({"a": WHOLE, "b": WHOLE})
    thread, out = in_thread(lambda: s.chat("STALL 2"))
    wait_until(lambda: len(heads.received) == 1, what="the first attempt")
    time.sleep(0.3)
    s.leave(heads.received[0][0])
    thread.join(timeout=10)
    events = sse_events(out[0])
    assert events[-1] == "[DONE]" and events[-2]["object"] == "error"
    final = chunks_of(events)[-1]
    assert final["choices"][0]["finish_reason"] == "error" and final["metrics"]["failovers"] == 0
    assert text_of(events) == "t0 t1 " and len(heads.received) == 1


def test_the_stream_waits_for_a_pipeline_to_appear(scheduler, heads):
    s = scheduler(replay_wait_s=10.0)
    s.bring_up({"a": WHOLE})
    thread, out = in_thread(lambda: s.chat("FAIL 2 peer_lost BLAME"))
    wait_until(lambda: len(heads.received) == 1, what="the first attempt")
    time.sleep(0.5)
    s.bring_up({"b": WHOLE})  # a new node joins and loads the model
    thread.join(timeout=10)
    assert_one_clean_stream(sse_events(out[0]))
    assert [h for h, _ in heads.received] == ["a", "b"]


def test_a_stalled_stream_is_cut_when_its_node_leaves(scheduler, heads):
    """The hang of issue 13: the head never reports the broken pipeline; the scheduler must
    not wait on it once a node of that pipeline is gone."""
    s = scheduler()
    s.bring_up({"a": WHOLE, "b": WHOLE})
    thread, out = in_thread(lambda: s.chat("STALL 2"))
    wait_until(lambda: len(heads.received) == 1, what="the first attempt")
    stalled_head, body = heads.received[0]
    time.sleep(0.3)
    s.leave(stalled_head)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert_one_clean_stream(sse_events(out[0]))
    wait_until(lambda: body["rid"] in heads.cancelled, what="the stalled attempt hung up")


@pytest.mark.slow
def test_a_named_node_that_refuses_connections_is_evicted_at_once(scheduler, heads):
    """A failure names a stage whose HTTP port refuses connections (its process is gone): the
    scheduler evicts it now rather than after the heartbeat timeout, so the allocator can
    rebuild without it."""
    s = scheduler(heartbeat_timeout_s=60.0)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    s.bring_up({"a": WHOLE})
    s.join("gone", 1000, http_url=dead_url)
    assert {n["node_id"] for n in s.status()["node_list"]} == {"a", "gone"}
    events = sse_events(s.chat("FAIL 3 peer_lost BLAME=gone"))
    assert_one_clean_stream(events)
    wait_until(lambda: {n["node_id"] for n in s.status()["node_list"]} == {"a"},
               what="the unreachable node's eviction", timeout=5)
    s.chat("FAIL 3 peer_lost BLAME")  # a live head named by a failure stays
    time.sleep(PROBE_TIMEOUT_S + 0.5)
    assert {n["node_id"] for n in s.status()["node_list"]} == {"a"}
