"""The seam of a replayed stream, without sockets: a new head primed with the ids the client has
seen the text of emits exactly the rest of the text, wherever the old pipeline broke.

The tokenizer is byte-level (one id per UTF-8 byte), so a multi-byte character spans several
ids and every byte boundary is a possible failure point. Each test cuts the stream after every
token and checks: text sent before the cut + text of the new head == the undisturbed text.
"""

from __future__ import annotations

import pytest

from parallax.serving.detokenizer import IncrementalDetokenizer
from parallax.serving.reasoning import ThinkParser
from parallax.serving.stop import StopStringMatcher
from parallax.serving.text_state import TextState

PROMPT = list(b"prompt: ")


class ByteTokenizer:
    """ids are UTF-8 bytes; an incomplete character decodes to U+FFFD, like BPE tokenizers."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return 256


def new_state(stop: list[str], think: bool) -> TextState:
    return TextState(IncrementalDetokenizer(ByteTokenizer(), PROMPT), StopStringMatcher(stop),
                     ThinkParser() if think else None)


def run_old_head(ids: list[int], cut: int, stop: list[str], think: bool):
    """The head that breaks after feeding `cut` ids: (reasoning sent, content sent, ids the
    scheduler learnt) — chunks carry the ids fed since the previous chunk, and the error chunk
    the ids fed since the last text (the frontend's internal leg: no flush on a failure)."""
    state = new_state(stop, think)
    reasoning, content, known = "", "", []
    for token_id in ids[:cut]:
        r, c = state.feed(token_id)
        if r or c:
            reasoning, content = reasoning + r, content + c
            known += state.take_ids()
        if state.stopped:
            break
    known += state.take_ids()  # the error chunk's ids
    return reasoning, content, known


def run_whole(ids: list[int], stop: list[str], think: bool) -> tuple[str, str]:
    state = new_state(stop, think)
    reasoning, content = "", ""
    for token_id in ids:
        r, c = state.feed(token_id)
        reasoning, content = reasoning + r, content + c
        if state.stopped:
            break
    r, c = state.finish()
    return reasoning + r, content + c


def run_new_head(ids: list[int], known: list[int], stop: list[str], think: bool):
    state = new_state(stop, think)
    state.prime(known)
    reasoning, content = "", ""
    if not state.stopped:
        for token_id in ids[len(known):]:
            r, c = state.feed(token_id)
            reasoning, content = reasoning + r, content + c
            if state.stopped:
                break
    r, c = state.finish()
    return reasoning + r, content + c


CASES = {
    "utf8": ("Grüße, 日本語 and emoji 🙂 done", [], False),
    "stop_straddles": ("the answer is 42 STOP and more text", ["STOP", "answer was"], False),
    "stop_prefix_then_not": ("a STO then STOP b", ["STOP"], False),
    "think_open": ("<think>some reasoning, ünïcode</think>the answer", [], True),
    "think_and_stop": ("<think>why not</think>yes END ignored", ["END"], True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_failure_point_continues_the_text_exactly(name):
    text, stop, think = CASES[name]
    ids = list(text.encode("utf-8"))
    expected = run_whole(ids, stop, think)
    for cut in range(len(ids) + 1):
        r_sent, c_sent, known = run_old_head(ids, cut, stop, think)
        assert known == ids[:len(known)]
        r_new, c_new = run_new_head(ids, known, stop, think)
        assert (r_sent + r_new, c_sent + c_new) == expected, f"cut after {cut} ids"


def test_the_utf8_character_is_held_across_the_seam():
    ids = list("ab日".encode())  # 日 is three bytes
    _, content, known = run_old_head(ids, 3, [], False)  # broke after its first byte
    assert content == "ab" and known == ids[:3]  # its first byte is known, not shown
    assert run_new_head(ids, known, [], False) == ("", "日")


def test_reasoning_open_at_the_failure_point_stays_reasoning():
    ids = list(b"<think>abc</think>xyz")
    reasoning, content, known = run_old_head(ids, 9, [], True)  # inside the block
    assert (reasoning, content) == ("ab", "")
    assert run_new_head(ids, known, [], True) == ("c", "xyz")


def test_a_stop_string_straddling_the_seam_is_never_leaked():
    ids = list(b"go ST")
    reasoning, content, known = run_old_head(ids, len(ids), ["STOP"], False)
    assert content == "go "  # "ST" held back: it may be the stop string
    rest = ids + list(b"OP tail")
    assert run_new_head(rest, known, ["STOP"], False) == ("", "")


# ---- the scheduler's side of the seam (parallax/scheduler/replay.py), pure -------------------


def _event(delta: dict, finish: str | None = None, ids: list[int] | None = None, **extra):
    return {"id": "attempt-rid", "object": "chat.completion.chunk", "created": 7,
            "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
            "parallax": {"token_ids": ids or []}, **extra}


def test_session_rewrites_chunks_and_splits_the_last_delta_from_the_final_chunk():
    from parallax.protocol.common import INVALID_REQUEST, PEER_LOST
    from parallax.scheduler.replay import Failure, ReplaySession, should_replay

    now = [0.0]
    session = ReplaySession("client-id", {"messages": []}, clock=lambda: now[0])
    assert session.on_event(_event({"role": "assistant", "content": ""}))[0]["id"] == "client-id"
    out = session.on_event(_event({"content": "a"}, ids=[5]))
    assert len(out) == 1 and out[0]["id"] == "client-id" and "parallax" not in out[0]
    assert session.on_event(_event({})) == []  # an empty delta: nothing for the client
    assert session.generated_ids == [5]
    session.on_event(_event({}, "error", ids=[6]))
    session.on_event({"object": "error", "message": "lost", "code": 503,
                      "parallax": {"kind": "peer_lost", "peer": "tcp://x:1"}})
    failure = session.end_attempt()
    assert failure == Failure(PEER_LOST, "lost", 503, "tcp://x:1")
    assert session.generated_ids == [5, 6] and should_replay(failure, 0, 3)
    assert not should_replay(Failure(INVALID_REQUEST, "bad"), 0, 3)
    assert not should_replay(failure, 3, 3)
    session.begin_replay()
    assert session.attempt_payload()["parallax"] == {"internal": True,
                                                     "resume_token_ids": [5, 6]}
    assert session.attempt_rid() == "client-id-r1"
    now[0] = 0.25
    assert session.on_event(_event({"role": "assistant", "content": ""}, created=9)) == []
    out = session.on_event(_event({"content": "z"}, "length", ids=[7],
                                  metrics={"ttft_ms": 1.0}))
    assert [c["choices"][0]["finish_reason"] for c in out] == [None, "length"]
    assert out[0]["choices"][0]["delta"] == {"content": "z"} and "metrics" not in out[0]
    assert out[1]["choices"][0]["delta"] == {} and out[1]["created"] == 7
    metrics = out[1]["metrics"]
    assert metrics["failovers"] == 1 and metrics["replay_ms"] == 250.0
    assert metrics["replayed_tokens"] == 2
    assert all("parallax" not in c for c in out) and session.end_attempt() is None


def test_session_relays_tool_call_deltas_and_collects_them_for_a_completion():
    """The scheduler's relay passes `delta.tool_calls` on, and a non-streaming client gets
    them whole in `message.tool_calls` (header chunk, then argument fragments)."""
    from parallax.scheduler.replay import ReplaySession

    session = ReplaySession("client-id", {"messages": []}, collect=True)
    session.on_event(_event({"role": "assistant", "content": ""}))
    header = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}]}
    out = session.on_event(_event(header, ids=[1]))
    assert out and out[0]["choices"][0]["delta"] == header
    session.on_event(_event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]},
                            ids=[2]))
    out = session.on_event(_event({"tool_calls": [{"index": 0, "function": {
        "arguments": ': "Paris"}'}}]}, "tool_calls", ids=[3]))
    assert [c["choices"][0]["finish_reason"] for c in out] == [None, "tool_calls"]
    message = session.completion()["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert session.completion()["choices"][0]["finish_reason"] == "tool_calls"


def test_session_sends_each_logprob_entry_once_and_collects_them():
    """The head's final chunk can carry the last text and its logprobs: the client gets them
    with the text copy only; a non-streaming client gets every entry in the completion."""
    from parallax.scheduler.replay import ReplaySession

    def entry(token: str) -> dict:
        return {"token": token, "logprob": -0.5, "bytes": list(token.encode()),
                "top_logprobs": []}

    def with_logprobs(event: dict, *tokens: str) -> dict:
        event["choices"][0]["logprobs"] = {"content": [entry(t) for t in tokens]}
        return event

    session = ReplaySession("client-id", {"messages": [], "logprobs": True}, collect=True)
    session.on_event(_event({"role": "assistant", "content": ""}))
    session.on_event(with_logprobs(_event({"content": "a"}, ids=[1]), "a"))
    out = session.on_event(with_logprobs(_event({"content": "b"}, "stop", ids=[2]), "b"))
    assert out[0]["choices"][0]["logprobs"]["content"] == [entry("b")]
    assert out[1]["choices"][0]["logprobs"] is None
    body = session.completion()
    assert body["choices"][0]["logprobs"] == {"content": [entry("a"), entry("b")]}
    plain = ReplaySession("client-id", {"messages": []}, collect=True)
    plain.on_event(_event({"content": "a"}, "stop", ids=[1]))
    assert plain.completion()["choices"][0]["logprobs"] is None


def test_prime_returns_the_content_the_same_ids_give_when_fed():
    """The tool-call stage is primed from what `prime` returns: it must be the content text
    feeding the ids one by one gives (reasoning excluded, stop strings applied)."""
    ids = list("<think>hmm</think>Answer: é END more".encode())
    fed = new_state(["END"], think=True)
    expected = "".join(fed.feed(token_id)[1] for token_id in ids)
    assert new_state(["END"], think=True).prime(ids) == expected
    assert expected.startswith("Answer") and "hmm" not in expected and "END" not in expected
