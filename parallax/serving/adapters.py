"""Other OpenAI endpoints as translations of the chat path's output.

`/v1/completions` and `/v1/responses` are served by the chat path itself: the request is
translated once into a chat request, generated (and, through the scheduler, replayed on failure)
exactly like a chat, and only its output is translated. An `OutputAdapter` turns each
`chat.completion.chunk` (or error event) into the events of the other API, and a non-streaming
`chat.completion` into that API's body. `adapt_response` applies one to the HTTP response the
chat path produced, on a node and on the scheduler alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec
from starlette.responses import Response, StreamingResponse

from parallax.serving.sse import DONE, SSEDecoder, encode_event

_JSON = "application/json"


class OutputAdapter(Protocol):
    """Chat output in, another API's output out (one instance per request)."""

    def on_event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """One decoded chat stream event (a chunk, or an error object) -> events to send."""
        ...

    def body(self, completion: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming `chat.completion` -> the other API's response body."""
        ...

    def encode(self, event: dict[str, Any]) -> bytes:
        """One outgoing event as SSE bytes."""
        ...


async def translate_sse(source: AsyncIterator[bytes],
                        adapter: OutputAdapter) -> AsyncIterator[bytes]:
    """Re-encode a chat SSE stream through `adapter`; comments (keep-alives) and `[DONE]` pass.

    The source yields whole events (the chat path never splits one), so each yielded piece is
    translated as soon as it comes; a split event would still be decoded once whole."""
    decoder = SSEDecoder()
    async for data in source:
        if data.startswith(b":"):  # an SSE comment: the scheduler's keep-alive
            yield data
            continue
        for event in decoder.feed(data):
            if event == "[DONE]":
                yield DONE
            elif isinstance(event, dict):
                for out in adapter.on_event(event):
                    yield adapter.encode(out)


def adapt_response(response: Response, adapter: OutputAdapter) -> Response:
    """The chat path's HTTP response translated: a stream event by event, a 200 JSON body as a
    whole; errors (the contract's body) pass unchanged."""
    if isinstance(response, StreamingResponse):
        response.body_iterator = translate_sse(response.body_iterator, adapter)
        return response
    if response.status_code != 200 or (response.media_type or _JSON) != _JSON:
        return response
    try:
        completion = msgspec.json.decode(response.body)
    except msgspec.DecodeError:
        return response
    if not isinstance(completion, dict) or completion.get("object") != "chat.completion":
        return response
    return Response(msgspec.json.encode(adapter.body(completion)), status_code=200,
                    media_type=_JSON)


def plain_encode(event: dict[str, Any]) -> bytes:
    """`data: {...}` (the chat API's framing)."""
    return encode_event(event)


def typed_encode(event: dict[str, Any]) -> bytes:
    """`event: <type>` then `data: {...}` (the Responses API's framing)."""
    kind = event.get("type")
    head = f"event: {kind}\n".encode() if isinstance(kind, str) else b""
    return head + encode_event(event)
