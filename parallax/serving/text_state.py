"""One request's text pipeline: token ids -> detokenizer -> stop strings -> reasoning split.

The state is a pure function of the ids fed so far, so a replayed request can rebuild it exactly:
a new head feeds the ids the client has already seen the text of (`prime`) and discards what
comes out; from then on it emits what the old head would have emitted. `unsent_ids` holds the ids
fed since the last chunk went out, so each chunk can carry the ids its text came from (the
internal leg, parallax/serving/internal_leg.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from parallax.serving.detokenizer import IncrementalDetokenizer
from parallax.serving.reasoning import ReasoningParser
from parallax.serving.stop import StopStringMatcher


class TextState:
    """Detokenizer, stop matcher and reasoning parser of one request, fed one token at a time."""

    def __init__(self, detokenizer: IncrementalDetokenizer, stop: StopStringMatcher,
                 parser: ReasoningParser | None = None) -> None:
        self.detokenizer = detokenizer
        self.stop = stop
        self.parser = parser  # None: no reasoning split (all text is content)
        self.unsent_ids: list[int] = []

    @property
    def stopped(self) -> bool:
        """A stop string was seen: nothing more is emitted."""
        return self.stop.stopped

    def _split(self, text: str, final: bool = False) -> tuple[str, str]:
        emit, _ = self.stop.feed(text)
        if final:
            emit += self.stop.flush()
        if self.parser is None:
            return "", emit
        reasoning, content = self.parser.feed(emit) if emit else ("", "")
        if final:
            r, c = self.parser.flush()
            reasoning, content = reasoning + r, content + c
        return reasoning, content

    def feed(self, token_id: int) -> tuple[str, str]:
        """One generated token in; the (reasoning, content) text it finalised out."""
        self.unsent_ids.append(int(token_id))
        return self._split(self.detokenizer.add(token_id))

    def finish(self) -> tuple[str, str]:
        """End of generation: everything still held back (nothing after a stop string)."""
        return self._split("" if self.stop.stopped else self.detokenizer.flush(), final=True)

    def prime(self, token_ids: Iterable[int]) -> str:
        """Feed ids whose text was already sent (a replay), exactly as they were fed first;
        returns the content text they gave (for later stages that hold state of their own,
        the tool-call parser)."""
        return "".join(self._split(self.detokenizer.add(token_id))[1] for token_id in token_ids)

    def take_ids(self) -> list[int]:
        """The ids fed since the last call (they go out with the chunk being built)."""
        ids, self.unsent_ids = self.unsent_ids, []
        return ids
