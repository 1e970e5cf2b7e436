"""Reasoning split end to end: `parallax serve` on scripted tiny models of the thinking families.

A random model writes gibberish, so these models are *successor models* (tests/tiny_models.py):
one layer whose weights make greedy decoding follow a fixed token chain through the real engine,
with no hook in the server. Each family gets a word-level tokenizer and a chat template of its
style, and the script makes the model write the markup itself:

- qwen3 (`<think>` template): `<think>User wants the capital of France.</think>\n\nIt is Paris!`
  then `<|im_end|>`; the template's `enable_thinking=False` closes an empty block in the prompt
  (the model goes straight to the answer), and `thinking=True` opens `<think>` in the
  prompt as Qwen3-Thinking-2507 templates do (the model starts inside the reasoning).
- gpt_oss (harmony): `<|channel|>analysis<|message|>User wants the capital of France.<|end|>`
  `<|start|>assistant<|channel|>final<|message|>It is Paris!<|return|>`.

Each server runs as a subprocess (`python -m parallax.cli serve -m <dir>`) on a free port; the
tests use the official `openai` client, streaming and not. Without the reasoning parser the
markup would land in `content` and `reasoning_content` would be missing: every test checks both.
"""

from __future__ import annotations

import pytest
import torch
from processes import serving_tiny_models
from tiny_models import greedy_tokens, save_successor_model, save_word_tokenizer

from parallax.models.loader import load_shard, load_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
REASONING = ["User", " wants", " the", " capital", " of", " France", "."]
ANSWER = ["It", " is", " Paris", "!"]
REASONING_TEXT = "User wants the capital of France."
ANSWER_TEXT = "It is Paris!"
MARKUP = ("<think>", "</think>", "<|", "|>")
WORDS = ["user", "assistant", "analysis", "final", "\n", "\n\n", " ", "What", " is", " the",
         " capital", " of", " France", "?", "User", " wants", ".", "It", " Paris", "!"]

QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}"
    "{%- elif thinking is defined and thinking %}{{- '<think>' }}"
    "{%- endif %}{%- endif %}"
)
# The prompt ends with "assistant\n" ("\n" -> <think>), or with "</think>\n\n" when thinking is
# off, or with "<think>" when the template opens it: the one chain covers all three.
QWEN3_SCRIPT = ["\n", "<think>", *REASONING, "</think>", "\n\n", *ANSWER, "<|im_end|>"]

HARMONY_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)
# The header tokens come twice: the branches pick "final" after <|channel|> once "analysis" was
# written, and the answer after <|message|> once "final" was.
HARMONY_SCRIPT = ["assistant", "<|channel|>", "analysis", "<|message|>", *REASONING, "<|end|>",
                  "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", *ANSWER,
                  "<|return|>"]
HARMONY_BRANCHES = [("<|channel|>", "analysis", "final"), ("<|message|>", "final", "It")]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """The two scripted model directories (config, safetensors, tokenizer, chat template)."""
    root = tmp_path_factory.mktemp("reasoning-models")
    qwen3 = root / "tiny-qwen3-thinking"
    tokenizer = save_word_tokenizer(qwen3, WORDS, ["<|im_start|>", "<|im_end|>"],
                                    ["<think>", "</think>"], "<|im_end|>", QWEN3_TEMPLATE)
    save_successor_model(qwen3, "qwen3", tokenizer, QWEN3_SCRIPT)
    gpt_oss = root / "tiny-gpt-oss-harmony"
    tokenizer = save_word_tokenizer(
        gpt_oss, WORDS, ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"], [],
        "<|return|>", HARMONY_TEMPLATE)
    save_successor_model(gpt_oss, "gpt_oss", tokenizer, HARMONY_SCRIPT, HARMONY_BRANCHES,
                         rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    return {"qwen3": str(qwen3), "gpt_oss": str(gpt_oss)}


# ---------------------------------------------------------------- the scripts, in process


@pytest.mark.parametrize("family, kwargs, expected", [
    ("qwen3", {}, "<think>User wants the capital of France.</think>\n\nIt is Paris!<|im_end|>"),
    ("qwen3", {"enable_thinking": False}, "It is Paris!<|im_end|>"),
    ("qwen3", {"thinking": True},
     "User wants the capital of France.</think>\n\nIt is Paris!<|im_end|>"),
    ("gpt_oss", {}, "<|channel|>analysis<|message|>User wants the capital of France.<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>It is Paris!<|return|>"),
])
def test_the_engine_writes_the_raw_script(model_dirs, family, kwargs, expected):
    """What the server gets to split: the model itself writes the markup, token by token."""
    path = model_dirs[family]
    tokenizer = load_tokenizer(path)
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True,
                                           **kwargs)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokens = greedy_tokens(load_shard(path).model, [ids], max_tokens=30)[0]
    finally:
        torch.set_num_threads(threads)
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    assert text.startswith(expected)  # ignore_eos: whatever follows the eos does not matter


# ---------------------------------------------------------------- through `parallax serve`


@pytest.fixture(scope="module")
def servers(model_dirs, tmp_path_factory):
    """Both `parallax serve` processes, started together; yields {family: openai client}."""
    with serving_tiny_models(model_dirs, tmp_path_factory.mktemp("reasoning-serve")) as clients:
        yield clients


def stream_split(client, **kwargs) -> tuple[list[tuple[str, str]], str, int]:
    """Stream a greedy answer; returns ([(kind, text) per delta], finish_reason, tokens)."""
    chunks = list(client.chat.completions.create(
        model="default", messages=QUESTION, temperature=0, stream=True,
        stream_options={"include_usage": True}, **kwargs))
    deltas = []
    for c in chunks:
        delta = c.choices[0].delta
        reasoning = (delta.model_extra or {}).get("reasoning_content")
        if reasoning:
            deltas.append(("reasoning", reasoning))
        if delta.content:
            deltas.append(("content", delta.content))
    return deltas, chunks[-1].choices[0].finish_reason, chunks[-1].usage.completion_tokens


def check_split(deltas, reasoning_text: str, content_text: str) -> None:
    kinds = [kind for kind, _ in deltas]
    assert kinds == sorted(kinds, key=("reasoning", "content").index)  # reasoning first
    reasoning = "".join(text for kind, text in deltas if kind == "reasoning")
    content = "".join(text for kind, text in deltas if kind == "content")
    assert (reasoning, content) == (reasoning_text, content_text)
    assert not any(mark in reasoning + content for mark in MARKUP)


def complete_split(client, **kwargs):
    r = client.chat.completions.create(model="default", messages=QUESTION, temperature=0,
                                       **kwargs)
    message = r.choices[0].message
    return (message.model_extra or {}).get("reasoning_content"), message.content, r


# qwen3: (chat_template_kwargs, reasoning, tokens generated: the chain from the prompt's end)
QWEN3_CASES = {
    "model opens <think>": ({}, REASONING_TEXT, 1 + len(REASONING) + 2 + len(ANSWER) + 1),
    "thinking disabled": ({"enable_thinking": False}, "", len(ANSWER) + 1),
    "template opens <think>": ({"thinking": True}, REASONING_TEXT,
                               len(REASONING) + 2 + len(ANSWER) + 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", QWEN3_CASES)
def test_qwen3_stream_splits_think_block(servers, case):
    kwargs, reasoning, num_tokens = QWEN3_CASES[case]
    extra = {"extra_body": {"chat_template_kwargs": kwargs}} if kwargs else {}
    deltas, finish_reason, tokens = stream_split(servers["qwen3"], **extra)
    check_split(deltas, reasoning, ANSWER_TEXT)
    assert finish_reason == "stop" and tokens == num_tokens


@pytest.mark.slow
@pytest.mark.parametrize("case", QWEN3_CASES)
def test_qwen3_non_streaming_has_reasoning_content(servers, case):
    kwargs, reasoning, num_tokens = QWEN3_CASES[case]
    extra = {"extra_body": {"chat_template_kwargs": kwargs}} if kwargs else {}
    reasoning_content, content, r = complete_split(servers["qwen3"], **extra)
    assert (reasoning_content, content) == (reasoning, ANSWER_TEXT)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == num_tokens


@pytest.mark.slow
def test_qwen3_answer_cut_inside_the_reasoning(servers):
    """max_tokens inside the block: what was thought so far is reasoning, no content."""
    deltas, finish_reason, _ = stream_split(servers["qwen3"], max_tokens=4)
    check_split(deltas, "User wants the", "")
    assert finish_reason == "length"
    reasoning_content, content, r = complete_split(servers["qwen3"], max_tokens=4)
    assert (reasoning_content, content, r.choices[0].finish_reason) == (
        "User wants the", "", "length")


@pytest.mark.slow
def test_gpt_oss_stream_splits_harmony_channels(servers):
    deltas, finish_reason, tokens = stream_split(servers["gpt_oss"])
    check_split(deltas, REASONING_TEXT, ANSWER_TEXT)
    assert finish_reason == "stop" and tokens == len(HARMONY_SCRIPT) - 1


@pytest.mark.slow
def test_gpt_oss_non_streaming_has_reasoning_content(servers):
    reasoning_content, content, r = complete_split(servers["gpt_oss"])
    assert (reasoning_content, content) == (REASONING_TEXT, ANSWER_TEXT)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(HARMONY_SCRIPT) - 1


@pytest.mark.slow
def test_gpt_oss_answer_cut_inside_the_analysis(servers):
    reasoning_content, content, r = complete_split(servers["gpt_oss"], max_tokens=6)
    assert (reasoning_content, content, r.choices[0].finish_reason) == (
        "User wants the", "", "length")
