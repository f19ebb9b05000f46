"""Server-sent event streams for the streaming API routes.

Litestar lets the route handler's media type (JSON, from the non-streamed return type) win over
the one a `Stream` response is built with, so a stream went out as `application/json`. An
`EventStream` keeps `text/event-stream` whatever the handler says.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import msgspec
from litestar.response import Stream

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def data_event(payload: Any) -> bytes:
    """`data: <json>`: OpenAI's chunks carry their kind in the JSON."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def typed_event(event: msgspec.Struct) -> bytes:
    """`event: <type>` then the JSON: Anthropic's and the Responses API's SDKs dispatch on the
    event line; the type is the struct's tag."""
    return named_event(type(event).__struct_config__.tag, event)


def named_event(name: str, payload: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encoder.encode(payload) + b"\n\n"


class EventStream(Stream):
    """A `text/event-stream` response over an async iterator of encoded events."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(events, media_type=SSE_MEDIA_TYPE, headers={**SSE_HEADERS, **(headers or {})})

    def to_asgi_response(self, *args: Any, **kwargs: Any):
        kwargs["media_type"] = SSE_MEDIA_TYPE
        return super().to_asgi_response(*args, **kwargs)
