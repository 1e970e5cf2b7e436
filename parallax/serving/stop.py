"""Stop strings over a stream of text deltas."""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Cut a text stream at the first occurrence of any stop string.

    `feed(text)` returns `(emit, stopped)`: `emit` is text that is certainly not part of a stop
    string; only the shortest suffix that could still grow into a stop string is held back.
    Once a stop string is seen, neither it nor anything after it is ever emitted, `stopped` is
    True and `matched` names it. Empty stop strings are ignored.
    """

    def __init__(self, stop: Iterable[str] | None = None) -> None:
        self.stop: list[str] = [s for s in dict.fromkeys(stop or ()) if s]
        self._max_hold = max((len(s) for s in self.stop), default=1) - 1
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a text delta; return `(text safe to emit, stopped)`."""
        if self.stopped:
            return "", True
        if not self.stop:
            return text, False
        buffer = self._held + text
        first = -1
        for s in self.stop:
            idx = buffer.find(s)
            if idx != -1 and (first == -1 or idx < first):
                first, self.matched = idx, s
        if first != -1:
            self.stopped = True
            self._held = ""
            return buffer[:first], True
        hold = self._hold_length(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """End of stream without a stop: release the held-back text."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return held
