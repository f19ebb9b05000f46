"""Server-sent event streams for the streaming API routes.

Litestar lets the route handler's media type (JSON, from the non-streamed return type) win over
the one a `Stream` response is built with, so a stream went out as `application/json`. An
`EventStream` keeps `text/event-stream` whatever the handler says.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, TypeVar

import msgspec
from litestar.response import Stream

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"
# an SSE comment: clients' parsers skip it, their connection sees data (Claude Code drops a
# connection that is idle for some minutes, Codex a stream idle for 5; a long prompt's prefill,
# or a wait in the queue, can take that long on a CPU)
KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_SECONDS = 10.0
# how long a route waits for the first delta before it answers 200 and keeps the stream alive:
# a request the engine refuses raises at once, so it still gets its HTTP status
ADMIT_SECONDS = 0.5
T = TypeVar("T")
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


async def with_keepalive(items: AsyncIterator[T], first_wait: float = ADMIT_SECONDS,
                         interval: float = KEEPALIVE_SECONDS) -> AsyncIterator[T | None]:
    """`items` with a None whenever the first item is slow to come: after `first_wait`
    seconds, then every `interval` seconds until it arrives (the route sends a KEEPALIVE
    for each). Once items flow they pass through as they are. Leaving early closes `items`."""
    first = asyncio.ensure_future(anext(items))
    try:
        wait = first_wait
        while not (await asyncio.wait({first}, timeout=wait))[0]:
            yield None
            wait = interval
        try:
            item = first.result()
        except StopAsyncIteration:
            return
        yield item
        async for item in items:
            yield item
    finally:
        if not first.done():
            first.cancel()  # the pending first step ends by the cancellation; its finally cleans up
            await asyncio.gather(first, return_exceptions=True)
        await items.aclose()
