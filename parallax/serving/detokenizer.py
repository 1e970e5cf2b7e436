"""Incremental detokenization: token ids in, finished text out, one token at a time.

Uses the prefix-offset approach of TGI / vLLM: decode a short window of already emitted tokens
alone and together with the new ones, and emit the difference. Decoding the window (instead of
the new token alone) keeps leading spaces right for SentencePiece-style tokenizers, and holding
back while the decoded tail ends in U+FFFD never emits half of a multi-byte UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# How many prompt tokens seed the decode window (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
INITIAL_WINDOW = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turn a stream of generated token ids into text deltas.

    `tokenizer` is any object with `decode(ids, skip_special_tokens=..., ...)` (a Hugging Face
    tokenizer). `prompt_ids`, when given, seeds the window so that the first generated token
    decodes in context (a leading space stays a space). Pass `skip_special_tokens=False` when a
    parser needs control tokens in the text (GPT-OSS harmony).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-(INITIAL_WINDOW + 1) :]) if prompt_ids else []
        # All ids the window may reach back into: a short prompt tail, then generated ids.
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text_parts: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids fed so far."""
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            list(ids),
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            if final:
                self._prefix_offset = self._read_offset = len(self._ids)
            return ""
        if not final and new_text.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete UTF-8 sequence: wait for the next token(s)
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text_parts.append(delta)
        return delta

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text it finalised (may be "")."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Feed several tokens at once (e.g. replaying a request); return the finalised text."""
        self._ids.extend(int(t) for t in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """End of generation: return whatever is still held back (even an incomplete char)."""
        return self._advance(final=True)
