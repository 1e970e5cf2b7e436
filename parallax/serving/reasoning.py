"""Streaming reasoning parsers: split generated text into (reasoning, content) deltas.

- `ThinkParser`: Qwen3 / MiniMax-M2 style `<think>…</think>` blocks.
- `HarmonyParser`: GPT-OSS harmony channels (`analysis` → reasoning, `final` → content).

Both take text deltas in any split (a tag may arrive one character at a time) and hold back only
what could still turn out to be a tag. `feed(text)` and `flush()` return `(reasoning, content)`.
"""

from __future__ import annotations

import re
from typing import Protocol

THINK_START = "<think>"
THINK_END = "</think>"


class ReasoningParser(Protocol):
    """What a request's text state (serving/text_state.py) needs from a reasoning parser."""

    def feed(self, text: str) -> tuple[str, str]: ...

    def flush(self) -> tuple[str, str]: ...


def _partial_suffix_len(text: str, token: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `token`."""
    for k in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-k:]):
            return k
    return 0


class ThinkParser:
    """Split `<think>reasoning</think>content`; the tags themselves are dropped.

    `start_in_reasoning=True` when the prompt already opened `<think>` (generation starts inside
    the reasoning). Otherwise an opening `<think>` is recognised only at the very start of the
    output (after optional whitespace), and only one reasoning block is parsed: later tags in the
    answer are content. With `strip_newlines` the newlines right after `<think>` / `</think>` and
    right before `</think>` are dropped (the templates put them there for layout only).
    """

    def __init__(self, start_in_reasoning: bool = False, strip_newlines: bool = True) -> None:
        self.strip_newlines = strip_newlines
        self._state = "reasoning" if start_in_reasoning else "start"
        self._buffer = ""
        self._lstrip = strip_newlines and start_in_reasoning

    @property
    def in_reasoning(self) -> bool:
        """True while the parser is inside the reasoning block."""
        return self._state == "reasoning"

    def _take_leading(self, text: str) -> str:
        """Drop newlines that follow a tag, until the first other character."""
        if self._lstrip:
            stripped = text.lstrip("\n")
            if stripped:
                self._lstrip = False
            return stripped
        return text

    def feed(self, text: str) -> tuple[str, str]:
        """Add a text delta; return `(reasoning_delta, content_delta)`."""
        reasoning: list[str] = []
        content: list[str] = []
        self._buffer += text
        while self._buffer:
            if self._state == "start":
                body = self._buffer.lstrip()
                if body.startswith(THINK_START):
                    self._buffer = body[len(THINK_START) :]
                    self._state = "reasoning"
                    self._lstrip = self.strip_newlines
                    continue
                if THINK_START.startswith(body):
                    break  # only whitespace and/or a partial "<think>" so far
                self._state = "content"
                continue
            if self._state == "reasoning":
                self._buffer = self._take_leading(self._buffer)
                idx = self._buffer.find(THINK_END)
                if idx != -1:
                    part = self._buffer[:idx]
                    reasoning.append(part.rstrip("\n") if self.strip_newlines else part)
                    self._buffer = self._buffer[idx + len(THINK_END) :]
                    self._state = "content"
                    self._lstrip = self.strip_newlines
                    continue
                hold = _partial_suffix_len(self._buffer, THINK_END)
                if self.strip_newlines:
                    rest = self._buffer[: len(self._buffer) - hold]
                    hold += len(rest) - len(rest.rstrip("\n"))
                reasoning.append(self._buffer[: len(self._buffer) - hold])
                self._buffer = self._buffer[len(self._buffer) - hold :]
                break
            # content: everything passes through
            content.append(self._take_leading(self._buffer))
            self._buffer = ""
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of stream: release held-back text into the section it belongs to."""
        buffer, self._buffer = self._buffer, ""
        if self._state == "reasoning":
            return buffer, ""
        if self._state == "start":
            return "", buffer
        return "", self._take_leading(buffer)


# ---------------------------------------------------------------- GPT-OSS harmony

_CONTROL_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_PARTIAL_CONTROL_RE = re.compile(r"<(?:\|[A-Za-z0-9_]{0,40}\|?)?\Z")
_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_END_TOKENS = ("<|end|>",)
_SECTION_BY_CHANNEL = {"analysis": "reasoning", "final": "content", "commentary": "content"}
_STOP_TOKENS = ("<|return|>", "<|call|>", "<|endoftext|>")


def _harmony_hold(text: str) -> int:
    """How many trailing chars could still be the start of a `<|...|>` control token."""
    m = _PARTIAL_CONTROL_RE.search(text)
    return len(text) - m.start() if m else 0


class HarmonyParser:
    """Split GPT-OSS harmony output into reasoning and content.

    The prompt ends with `<|start|>assistant`; the model then writes messages such as
    `<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…<|return|>`.
    `analysis` is reasoning; `final` and a `commentary` preamble without a recipient are content;
    tool calls (a `to=` recipient) and every control token are dropped. A body ends at `<|end|>`,
    `<|return|>`, `<|call|>`, a new `<|start|>`/`<|channel|>`, or the end of the stream.
    The detokenizer must keep special tokens (`skip_special_tokens=False`).

    `channel` (a harmony channel name such as "final") starts inside a message body of that
    channel, for a prompt that already ends with `...<|channel|>final<|message|>`.
    """

    def __init__(self, channel: str | None = None) -> None:
        self._buffer = ""
        self._state = "body" if channel else "header"
        self._section: str | None = _SECTION_BY_CHANNEL.get(channel) if channel else None
        self._seen_control = channel is not None

    @staticmethod
    def section_of_header(header: str) -> str | None:
        """The output section ('reasoning', 'content' or None = drop) for a message header."""
        if "to=" in header:
            return None  # a tool call: not for the user
        m = _CHANNEL_RE.search(header)
        return _SECTION_BY_CHANNEL.get(m.group(1) if m else "final")

    def feed(self, text: str) -> tuple[str, str]:
        """Add a text delta; return `(reasoning_delta, content_delta)`."""
        out: dict[str, list[str]] = {"reasoning": [], "content": []}
        self._buffer += text
        while self._buffer and self._state != "done":
            if self._state == "header":
                if not self._seen_control:
                    stripped = self._buffer.lstrip()
                    if stripped and not stripped.startswith("<|"[: len(stripped)]):
                        # Plain text without any harmony framing: treat it all as the answer.
                        self._state, self._section = "body", "content"
                        continue
                idx = self._buffer.find("<|message|>")
                if idx == -1:
                    if "<|" in self._buffer:
                        self._seen_control = True
                    break
                self._seen_control = True
                self._section = self.section_of_header(self._buffer[:idx])
                self._buffer = self._buffer[idx + len("<|message|>") :]
                self._state = "body"
                continue
            # body
            m = _CONTROL_RE.search(self._buffer)
            if m is None:
                hold = _harmony_hold(self._buffer)
                self._emit(out, self._buffer[: len(self._buffer) - hold])
                self._buffer = self._buffer[len(self._buffer) - hold :]
                break
            self._seen_control = True
            self._emit(out, self._buffer[: m.start()])
            token = m.group(0)
            if token in _STOP_TOKENS:
                self._state, self._buffer = "done", ""
            elif token in _END_TOKENS or token == "<|start|>":
                self._state, self._buffer = "header", self._buffer[m.end() :]
            elif token == "<|channel|>":
                self._state, self._buffer = "header", self._buffer[m.start() :]
            else:  # <|message|>, <|constrain|>, reserved tokens...: drop the token itself
                self._buffer = self._buffer[m.end() :]
        if self._state == "done":
            self._buffer = ""
        return "".join(out["reasoning"]), "".join(out["content"])

    def _emit(self, out: dict[str, list[str]], text: str) -> None:
        if text and self._section is not None:
            out[self._section].append(text)

    def flush(self) -> tuple[str, str]:
        """End of stream: an unfinished body is emitted; an unfinished header is dropped."""
        buffer, self._buffer = self._buffer, ""
        if self._state != "body" or self._section is None:
            return "", ""
        if self._section == "reasoning":
            return buffer, ""
        return "", buffer


# ---------------------------------------------------------------- selection

THINK_MODEL_TYPES = frozenset({"qwen3", "qwen3_moe", "minimax_m2"})
HARMONY_MODEL_TYPES = frozenset({"gpt_oss"})


def make_reasoning_parser(
    model_type: str, prompt_text: str, enable_thinking: bool = True
) -> ThinkParser | HarmonyParser | None:
    """Pick the parser for a model family, given the rendered prompt.

    qwen3 / qwen3_moe / minimax_m2 → `ThinkParser`, starting inside the reasoning when the prompt
    ends with an opened `<think>`; gpt_oss → `HarmonyParser`. Any other family gets a
    `ThinkParser` only if its prompt ends with an opened `<think>` (e.g. R1 distills), else None.
    `enable_thinking=False` never hurts: a template that disables thinking closes the block in the
    prompt, and the parser still strips an empty `<think></think>` the model may write itself.
    """
    tail = prompt_text.rstrip(" \n")
    opened = tail.endswith(THINK_START)
    if model_type in HARMONY_MODEL_TYPES:
        if prompt_text.endswith("<|message|>"):
            header = prompt_text[prompt_text.rfind("<|start|>") :]
            m = _CHANNEL_RE.search(header)
            return HarmonyParser(channel=m.group(1) if m else "final")
        return HarmonyParser()
    if model_type in THINK_MODEL_TYPES:
        return ThinkParser(start_in_reasoning=opened)
    if opened and enable_thinking:
        return ThinkParser(start_in_reasoning=True)
    return None
