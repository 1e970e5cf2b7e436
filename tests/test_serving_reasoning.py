"""Reasoning parsers: any split of the output gives the same reasoning and content."""

from __future__ import annotations

import pytest

from parallax.serving.reasoning import HarmonyParser, ThinkParser, make_reasoning_parser


def run(parser, parts: list[str]) -> tuple[str, str]:
    reasoning, content = [], []
    for part in parts:
        r, c = parser.feed(part)
        reasoning.append(r)
        content.append(c)
    r, c = parser.flush()
    reasoning.append(r)
    content.append(c)
    return "".join(reasoning), "".join(content)


def check_all_splits(make, text: str, expected: tuple[str, str]) -> None:
    assert run(make(), [text]) == expected
    assert run(make(), list(text)) == expected
    for i in range(len(text) + 1):
        assert run(make(), [text[:i], text[i:]]) == expected, i
    # three parts around every position of each tag-ish character
    for i in range(len(text) + 1):
        for j in range(i, min(len(text), i + 12) + 1):
            assert run(make(), [text[:i], text[i:j], text[j:]]) == expected, (i, j)


THINK_CASES = [
    # (start_in_reasoning, output, (reasoning, content))
    (
        False,
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        ("Let me think.", "The answer is 4."),
    ),
    (False, "<think>\n\n</think>\n\nHi!", ("", "Hi!")),
    (False, "Plain answer, no tags.", ("", "Plain answer, no tags.")),
    (False, "\n\nPlain after newlines", ("", "\n\nPlain after newlines")),
    (False, "<thin>not a tag", ("", "<thin>not a tag")),
    (
        False,
        "Use <think> tags like <think>x</think>",
        ("", "Use <think> tags like <think>x</think>"),
    ),
    (
        False,
        "<think>a < b and c </ d </thin\n\nx</think>yes",
        ("a < b and c </ d </thin\n\nx", "yes"),
    ),
    (False, "<think>unfinished reasoning", ("unfinished reasoning", "")),
    (False, "<think>ends with partial </thi", ("ends with partial </thi", "")),
    (False, "<thi", ("", "<thi")),
    (True, "step 1\nstep 2\n</think>\n\n答案是 4 😀", ("step 1\nstep 2", "答案是 4 😀")),
    (True, "\nreasoning only, cut off\n", ("reasoning only, cut off\n", "")),
    (True, "</think>direct", ("", "direct")),
    (True, "x\n\n\n</think>\n\n\n y\n</think>z", ("x", " y\n</think>z")),
]


@pytest.mark.parametrize(("start", "text", "expected"), THINK_CASES)
def test_think_parser_every_split(start: bool, text: str, expected: tuple[str, str]) -> None:
    check_all_splits(lambda: ThinkParser(start_in_reasoning=start), text, expected)


def test_think_parser_without_newline_stripping() -> None:
    text = "<think>\nr\n</think>\n\nc"
    check_all_splits(lambda: ThinkParser(strip_newlines=False), text, ("\nr\n", "\n\nc"))


def test_think_parser_streams_early() -> None:
    p = ThinkParser(start_in_reasoning=True)
    assert p.feed("abc") == ("abc", "")
    assert p.feed(" def</th") == (" def", "")
    assert p.in_reasoning
    assert p.feed("ink>ok") == ("", "ok")
    assert not p.in_reasoning
    assert p.feed(" <think>") == ("", " <think>")


HARMONY_CASES = [
    (
        "<|channel|>analysis<|message|>User asks 2+2. Answer 4.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>",
        ("User asks 2+2. Answer 4.", "2 + 2 = 4."),
    ),
    (
        "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>done",
        ("think", "done"),
    ),
    (
        "<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>final<|message|>b<|end|>",
        ("a", "b"),
    ),
    (
        "<|channel|>final<|message|>only final, with <b>html</b> and a < c|> d<|return|>trailing",
        ("", "only final, with <b>html</b> and a < c|> d"),
    ),
    ("<|channel|>analysis<|message|>cut off mid reasoning <|", ("cut off mid reasoning <|", "")),
    (
        "<|channel|>analysis<|message|>need tool<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city":"Paris"}<|call|>',
        ("need tool", ""),
    ),
    (
        "<|channel|>commentary<|message|>Checking…<|end|><|start|>assistant<|channel|>final"
        "<|message|>Sunny ☀️<|return|>",
        ("", "Checking…Sunny ☀️"),
    ),
    ("<|channel|>analysis<|message|>x<|channel|>final<|message|>y", ("x", "y")),
    ("<|channel|>final<|message|>a<|reserved_200012|>b", ("", "ab")),
    ("Plain text without harmony framing", ("", "Plain text without harmony framing")),
    ("<|channel|>analysis<|message|>r<|end|><|start|>assistant", ("r", "")),
]


@pytest.mark.parametrize(("text", "expected"), HARMONY_CASES)
def test_harmony_parser_every_split(text: str, expected: tuple[str, str]) -> None:
    check_all_splits(HarmonyParser, text, expected)
    reasoning, content = expected
    for leaked in ("<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|return|>"):
        assert leaked not in reasoning and leaked not in content


def test_harmony_parser_starting_in_channel() -> None:
    check_all_splits(lambda: HarmonyParser(channel="final"), "answer<|return|>", ("", "answer"))
    check_all_splits(
        lambda: HarmonyParser(channel="analysis"),
        "r<|end|><|start|>assistant<|channel|>final<|message|>c",
        ("r", "c"),
    )


def test_make_reasoning_parser() -> None:
    for model_type in ("qwen3", "qwen3_moe", "minimax_m2"):
        p = make_reasoning_parser(model_type, "<|im_start|>assistant\n", True)
        assert isinstance(p, ThinkParser) and not p.in_reasoning
        p = make_reasoning_parser(model_type, "<|im_start|>assistant\n<think>\n", True)
        assert isinstance(p, ThinkParser) and p.in_reasoning
        p = make_reasoning_parser(model_type, "x<think>", True)
        assert isinstance(p, ThinkParser) and p.in_reasoning
        closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        p = make_reasoning_parser(model_type, closed, False)
        assert isinstance(p, ThinkParser) and not p.in_reasoning
    assert isinstance(make_reasoning_parser("gpt_oss", "<|start|>assistant", True), HarmonyParser)
    p = make_reasoning_parser("gpt_oss", "<|start|>assistant<|channel|>final<|message|>", True)
    assert isinstance(p, HarmonyParser)
    assert run(p, ["hi<|return|>"]) == ("", "hi")
    assert make_reasoning_parser("llama", "<|im_start|>assistant\n", True) is None
    assert make_reasoning_parser("qwen2", "<|im_start|>assistant\n", False) is None
    p = make_reasoning_parser("qwen2", "<｜Assistant｜><think>\n", True)
    assert isinstance(p, ThinkParser) and p.in_reasoning
