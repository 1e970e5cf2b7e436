"""SSE encoding and parsing round trips."""

from __future__ import annotations

import asyncio
import json

import pytest

from parallax.serving.sse import DONE, SSEDecoder, aparse_sse_lines, encode_event, parse_sse_lines

EVENTS = [
    {"id": "a", "choices": [{"delta": {"content": "héllo 世界 😀\n"}}]},
    {"id": "a", "choices": [{"delta": {"content": "line1\nline2"}}], "usage": None},
    {"object": "error", "message": "x", "type": "internal_error", "code": 500},
]


def stream_bytes() -> bytes:
    return b"".join(encode_event(e) for e in EVENTS) + DONE


def test_encode_event_format() -> None:
    raw = encode_event({"a": 1, "b": "é"})
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert raw.count(b"\n") == 2  # the JSON itself never contains a raw newline
    assert json.loads(raw[len(b"data: ") : -2].decode()) == {"a": 1, "b": "é"}
    assert "é".encode() in raw
    assert DONE == b"data: [DONE]\n\n"


def test_parse_lines_like_httpx_iter_lines() -> None:
    lines = stream_bytes().decode().split("\n")
    assert list(parse_sse_lines(lines)) == [*EVENTS, "[DONE]"]


def test_parse_whole_events_and_bytes() -> None:
    items = [encode_event(e) for e in EVENTS] + [DONE]
    assert list(parse_sse_lines(items)) == [*EVENTS, "[DONE]"]


def test_parse_ignores_comments_and_other_fields_and_crlf() -> None:
    text = ': keep-alive\r\nevent: message\r\nid: 3\r\ndata: {"x": 1}\r\n\r\ndata:[DONE]\r\n'
    assert list(parse_sse_lines(text.split("\n"))) == [{"x": 1}, "[DONE]"]


def test_multiline_data_is_joined() -> None:
    assert list(parse_sse_lines(['data: {"a":', "data: 2}", ""])) == [{"a": 2}]


def test_invalid_json_raises() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        list(parse_sse_lines(["data: {nope", ""]))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_decoder_arbitrary_chunks(size: int) -> None:
    raw = stream_bytes().decode()
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(raw), size):
        events.extend(decoder.feed(raw[i : i + size]))
    events.extend(decoder.close())
    assert events == [*EVENTS, "[DONE]"]


def test_async_parse() -> None:
    async def lines():
        for line in stream_bytes().decode().split("\n"):
            yield line

    async def collect():
        return [e async for e in aparse_sse_lines(lines())]

    assert asyncio.run(collect()) == [*EVENTS, "[DONE]"]
