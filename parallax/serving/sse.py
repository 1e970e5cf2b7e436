"""Server-sent events: encoding chunks and parsing `data:` lines back (tests, proxies)."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Iterator
from typing import Any

import msgspec

DONE = b"data: [DONE]\n\n"
DONE_MARKER = "[DONE]"
MEDIA_TYPE = "text/event-stream"
# the headers every event stream of ours goes out with: never cached, never held back by a
# buffering reverse proxy (nginx honours X-Accel-Buffering)
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_encoder = msgspec.json.Encoder()


def encode_event(obj: dict[str, Any]) -> bytes:
    """`data: <compact json>\\n\\n` (UTF-8, non-ASCII kept as is)."""
    return b"data: " + _encoder.encode(obj) + b"\n\n"


def _decode_data(data: str) -> dict[str, Any] | str:
    if data.strip() == DONE_MARKER:
        return DONE_MARKER
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"SSE data is not valid JSON: {data[:200]!r}") from exc


class SSEDecoder:
    """Incremental SSE parser: feed lines (or arbitrary byte/str chunks) and collect events.

    Only `data:` fields matter; comments (`:`), `event:`, `id:` and `retry:` are ignored. An event
    ends at a blank line; several `data:` lines in one event are joined with newlines. Each event
    is a decoded JSON value (normally a dict) or the string `"[DONE]"`.
    """

    def __init__(self) -> None:
        self._partial = ""
        self._data: list[str] = []

    def feed_line(self, line: str | bytes) -> list[dict[str, Any] | str]:
        """Feed one line (trailing newline optional); return events it completed."""
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return []
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return []

    def feed(self, chunk: str | bytes) -> list[dict[str, Any] | str]:
        """Feed an arbitrary chunk of the stream (may split lines anywhere except mid-UTF-8)."""
        if isinstance(chunk, bytes):
            chunk = chunk.decode("utf-8")
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        events: list[dict[str, Any] | str] = []
        for line in lines:
            events.extend(self.feed_line(line))
        return events

    def close(self) -> list[dict[str, Any] | str]:
        """End of stream: return a last event that was not followed by a blank line."""
        events: list[dict[str, Any] | str] = []
        if self._partial:
            events.extend(self.feed_line(self._partial))
            self._partial = ""
        events.extend(self._dispatch())
        return events

    def _dispatch(self) -> list[dict[str, Any] | str]:
        if not self._data:
            return []
        data = "\n".join(self._data)
        self._data = []
        return [_decode_data(data)]


def parse_sse_lines(lines: Iterable[str | bytes]) -> Iterator[dict[str, Any] | str]:
    """Yield each event of an SSE stream given line by line (e.g. `httpx.Response.iter_lines()`).

    Items may also hold several lines (`"data: {...}\\n\\n"`); each yields a dict or `"[DONE]"`.
    """
    decoder = SSEDecoder()
    for item in lines:
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if "\n" in item:
            yield from decoder.feed(item if item.endswith("\n") else item + "\n")
        else:
            yield from decoder.feed_line(item)
    yield from decoder.close()


async def aparse_sse_lines(
    lines: AsyncIterable[str | bytes],
) -> AsyncIterable[dict[str, Any] | str]:
    """Async twin of `parse_sse_lines` (e.g. for `httpx.Response.aiter_lines()`)."""
    decoder = SSEDecoder()
    async for item in lines:
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if "\n" in item:
            events = decoder.feed(item if item.endswith("\n") else item + "\n")
        else:
            events = decoder.feed_line(item)
        for event in events:
            yield event
    for event in decoder.close():
        yield event
