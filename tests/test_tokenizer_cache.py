"""A GGUF's tokenizer is converted once per file and kept on disk; a node that takes other
layers of the same model keeps its tokenizer, and loads a local GGUF's meanwhile."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from transformers import AutoTokenizer

from parallax.config import JoinConfig
from parallax.models import tokenizer_cache
from parallax.models.hub import DEFAULT_MODEL, builtin_gguf_path
from parallax.models.loader import load_tokenizer
from parallax.node.agent import NodeAgent
from parallax.protocol.control import Assignment, NodeJoin

TEXTS = ["Hello, world!", "  spaces\tand\n\nnewlines", "émojis 🙂 and 中文",
         "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2  # comment"]
CHAT = [{"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def converted():
    """SmolLM2's tokenizer converted from the GGUF by transformers, no cache involved."""
    path = builtin_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture
def conversions(monkeypatch, converted):
    """Counts GGUF conversions (answered with the module's converted tokenizer, at once)."""
    calls: list[str] = []
    real = AutoTokenizer.from_pretrained

    def from_pretrained(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real(path, *args, **kwargs)
        calls.append(gguf_file)
        return converted

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    return calls


def assert_same_tokenizer(got, expected) -> None:
    for text in TEXTS:
        assert got.encode(text) == expected.encode(text), text
        assert got.decode(got.encode(text)) == expected.decode(expected.encode(text))
    assert got.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        expected.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert got.get_vocab() == expected.get_vocab()
    assert (got.bos_token_id, got.eos_token_id, got.pad_token_id, got.all_special_ids) == \
        (expected.bos_token_id, expected.eos_token_id, expected.pad_token_id,
         expected.all_special_ids)


def test_the_second_load_reads_the_cache_and_equals_the_conversion(tmp_path, monkeypatch,
                                                                   conversions, converted):
    monkeypatch.setenv("PARALLAX_TOKENIZER_CACHE", str(tmp_path))
    first = load_tokenizer(builtin_gguf_path())
    assert first is converted and len(conversions) == 1
    entry = tokenizer_cache.cache_entry(builtin_gguf_path())
    assert (entry / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging-")]
    second = load_tokenizer(builtin_gguf_path())
    assert len(conversions) == 1, "the cached tokenizer was converted again"
    assert second is not converted
    assert_same_tokenizer(second, converted)


def test_another_file_or_a_changed_one_gets_its_own_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLAX_TOKENIZER_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "model.gguf"
    copy.write_bytes(b"not read here")
    before = tokenizer_cache.cache_entry(str(copy))
    assert before != tokenizer_cache.cache_entry(builtin_gguf_path())
    os.utime(copy, ns=(0, os.stat(copy).st_mtime_ns + 10**9))
    assert tokenizer_cache.cache_entry(str(copy)) != before


def test_a_damaged_entry_is_converted_again_and_replaced(tmp_path, monkeypatch, conversions,
                                                         converted):
    monkeypatch.setenv("PARALLAX_TOKENIZER_CACHE", str(tmp_path))
    entry = tokenizer_cache.cache_entry(builtin_gguf_path())
    entry.mkdir(parents=True)
    (entry / "tokenizer_config.json").write_text("{ not json")
    assert load_tokenizer(builtin_gguf_path()) is converted and len(conversions) == 1
    json.loads((entry / "tokenizer_config.json").read_text())  # rewritten whole
    assert_same_tokenizer(load_tokenizer(builtin_gguf_path()), converted)
    assert len(conversions) == 1


def test_a_cache_that_cannot_be_written_still_gives_the_tokenizer(tmp_path, monkeypatch,
                                                                  conversions, converted):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PARALLAX_TOKENIZER_CACHE", str(blocker / "cache"))
    assert load_tokenizer(builtin_gguf_path()) is converted
    assert load_tokenizer(builtin_gguf_path()) is converted and len(conversions) == 2


class FakeClient:
    def __init__(self) -> None:
        self.configs: list = []

    async def reconfigure(self, config) -> None:
        self.configs.append(config)


class FakeFrontend:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.never = asyncio.Event()

    def forget_tokenizer(self) -> None:
        self.calls.append(("forget", None))

    def preload_tokenizer(self, path: str) -> None:
        self.calls.append(("preload", path))

    async def wait_ready(self) -> None:
        await self.never.wait()


def test_a_node_keeps_its_tokenizer_across_layer_changes_of_one_model(tmp_path) -> None:
    """A survivor that takes over a dead node's layers reloads its executor only (the tokenizer
    took ~10 s to convert, which pushed a replay past its wait); a local GGUF's tokenizer loads
    while the executor does; another model's replaces it."""
    other = tmp_path / "other.gguf"
    other.write_bytes(b"")

    async def main() -> list:
        frontend, client = FakeFrontend(), FakeClient()
        join = NodeJoin("me", "cpu", "cpu", 2**30, 1.0, 1.0, "http://me:3000", "tcp://me:3100")
        agent = NodeAgent(JoinConfig(), client, frontend, join, "http://scheduler",
                          "tcp://*:3100", say=lambda _m: None)
        for model, start, end in ((DEFAULT_MODEL, 0, 15), (DEFAULT_MODEL, 15, 30),
                                  (str(other), 0, 30)):
            await agent.apply(Assignment(model=model, start_layer=start, end_layer=end,
                                         generation=1))
            frontend.calls.append(("applied", model))
        await agent.apply(None)  # standby keeps it too
        await agent.apply(Assignment(model=str(other), start_layer=0, end_layer=30,
                                     generation=2))
        agent._ready_task.cancel()
        assert len(client.configs) == 5
        return frontend.calls

    calls = asyncio.run(main())
    assert calls == [
        ("forget", None), ("preload", builtin_gguf_path()), ("applied", DEFAULT_MODEL),
        ("preload", builtin_gguf_path()), ("applied", DEFAULT_MODEL),
        ("forget", None), ("preload", str(other)), ("applied", str(other)),
        ("preload", str(other)),
    ]
