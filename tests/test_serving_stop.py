"""Stop strings: hold back only what may start a stop string, never emit the stop or beyond."""

from __future__ import annotations

import itertools

import pytest

from parallax.serving.stop import StopStringMatcher

CASES = [
    # (text, stop strings, expected emitted text, stopped)
    ("Hello world. END and more", ["END"], "Hello world. ", True),
    ("no stop here at all", ["END"], "no stop here at all", False),
    ("ababac", ["abac"], "ab", True),
    ("aaab", ["aab"], "a", True),
    ("x<|im_end|>y", ["<|im_end|>", "\n\n"], "x", True),
    ("first\n\nsecond<|im_end|>", ["<|im_end|>", "\n\n"], "first", True),
    ("abcx", ["abcd", "cx"], "ab", True),
    ("the end is E", ["END"], "the end is E", False),
    ("日本語の文。終わり", ["終わり"], "日本語の文。", True),
    ("ends with EN", ["END"], "ends with EN", False),
    ("STOP", ["STOP"], "", True),
]


def run(parts: list[str], stop: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopStringMatcher(stop)
    emitted: list[str] = []
    stopped = False
    for part in parts:
        emit, stopped = matcher.feed(part)
        emitted.append(emit)
        if stopped:
            break
    if not stopped:
        emitted.append(matcher.flush())
    return "".join(emitted), stopped, emitted


@pytest.mark.parametrize(("text", "stop", "expected", "stopped"), CASES)
def test_every_split_point(text: str, stop: list[str], expected: str, stopped: bool) -> None:
    n = len(text)
    # one split and two splits at every position
    for i, j in itertools.combinations_with_replacement(range(n + 1), 2):
        out, did_stop, _ = run([text[:i], text[i:j], text[j:]], stop)
        assert (out, did_stop) == (expected, stopped), (i, j)
    # single characters
    out, did_stop, _ = run(list(text), stop)
    assert (out, did_stop) == (expected, stopped)


def test_holds_back_only_minimal_suffix() -> None:
    m = StopStringMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("ENx", False)
    assert m.feed("EXTRA") == ("EXTRA", False)  # "A" cannot start "END"
    assert m.feed("E") == ("", False)
    assert m.flush() == "E"


def test_stopped_matcher_swallows_everything() -> None:
    m = StopStringMatcher(["\n"])
    assert m.feed("a\nb") == ("a", True)
    assert m.matched == "\n" and m.stopped
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_no_stop_strings_passthrough() -> None:
    for stops in ([], [""], None):
        m = StopStringMatcher(stops)
        assert m.feed("E") == ("E", False)
        assert m.flush() == ""


def test_matched_reports_earliest() -> None:
    m = StopStringMatcher(["world", "lo w"])
    assert m.feed("hello world") == ("hel", True)
    assert m.matched == "lo w"
