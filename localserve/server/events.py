"""The server's event bus and `GET /api/events`, a server-sent event stream for monitors.

Event types (the SSE `event:` field; `data:` is the JSON object of the event):
    hello           sent first on every stream: the subscription is live from here on
    model_load      a model finished loading (name, backend, source, load_seconds, max_context)
    model_unload    the server is shutting its model down
    request_start   id, model, prompt_tokens, n, max_tokens
    request_finish  id, model, status, finish_reason(s), prompt/cached/output tokens, ttft, duration, tok_s
    stats           every second while a model is served: running, waiting, queue, KV pages and
                    usage, prefix hit rate (lifetime and over the last interval), tok/s
    job             pull / quantize job progress and outcome (see jobs.py)

Publishers run on any thread (the engine thread, the loader thread, job threads, the event
loop); each subscriber owns a bounded asyncio queue on the server's loop, and a subscriber that
reads too slowly loses its oldest events instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from litestar import Request, get
from litestar.response import ServerSentEvent, ServerSentEventMessage

EVENTS_KEY = "localserve.events"
STATS_INTERVAL = 1.0
KEEPALIVE_SECONDS = 15.0


@dataclass(slots=True)
class Event:
    id: int
    type: str
    time: float  # unix seconds
    data: dict

    def to_json(self) -> str:
        return json.dumps({"event_id": self.id, "type": self.type, "time": self.time, **self.data})


@dataclass(slots=True, eq=False)
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    types: frozenset[str] | None  # None: every type
    dropped: int = 0


def _offer(sub: _Subscriber, event: Event | None) -> None:
    """Runs on the subscriber's loop: drop the oldest event when the queue is full. None ends
    the subscriber's stream."""
    if sub.queue.full():
        sub.queue.get_nowait()
        sub.dropped += 1
    sub.queue.put_nowait(event)


@dataclass
class EventBus:
    queue_size: int = 1024
    history: int = 64  # recent non-stats events, for `recent()` (status pages, late monitors)
    _subs: set[_Subscriber] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _recent: deque = field(default_factory=deque)

    def publish(self, type: str, **data) -> Event:
        with self._lock:
            event = Event(next(self._ids), type, time.time(), data)
            if type != "stats":
                self._recent.append(event)
                while len(self._recent) > self.history:
                    self._recent.popleft()
            subs = list(self._subs)
        for sub in subs:
            if sub.types is None or type in sub.types:
                try:
                    sub.loop.call_soon_threadsafe(_offer, sub, event)
                except RuntimeError:  # that loop has closed: the subscriber is gone
                    self._remove(sub)
        return event

    def recent(self) -> list[Event]:
        with self._lock:
            return list(self._recent)

    @property
    def num_subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self, types: frozenset[str] | None = None) -> _Subscriber:
        """Registers now, on the running loop: every event published after this call reaches
        `subscriber.queue` until `unsubscribe`."""
        sub = _Subscriber(asyncio.get_running_loop(), asyncio.Queue(self.queue_size), types)
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._remove(sub)

    def close(self) -> None:
        """Ends every open stream (the server is stopping: uvicorn would wait for them)."""
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(_offer, sub, None)
            except RuntimeError:
                self._remove(sub)

    def _remove(self, sub: _Subscriber) -> None:
        with self._lock:
            self._subs.discard(sub)


def event_bus(request: Request) -> EventBus:
    return request.app.state[EVENTS_KEY]


@get("/api/events", summary="Server-sent events: model load/unload, requests, engine stats, jobs",
     tags=["monitor"])
async def events(request: Request, types: str | None = None) -> ServerSentEvent:
    """`types`: a comma-separated subset of event types (default: all)."""
    wanted = frozenset(t.strip() for t in types.split(",") if t.strip()) if types else None
    return ServerSentEvent(_stream(event_bus(request), wanted))


async def _stream(bus: EventBus, types: frozenset[str] | None) -> AsyncIterator[ServerSentEventMessage]:
    # subscribed before "hello" goes out: a client that waits for hello misses nothing after it
    sub = bus.subscribe(types)
    try:
        yield ServerSentEventMessage(data=json.dumps({"type": "hello", "time": time.time()}), event="hello")
        while True:
            try:
                ev: Event | None = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:  # a comment line keeps proxies from closing an idle stream
                yield ServerSentEventMessage(comment="keep-alive")
                continue
            if ev is None:  # EventBus.close()
                return
            yield ServerSentEventMessage(data=ev.to_json(), event=ev.type, id=str(ev.id))
    finally:
        bus.unsubscribe(sub)


@dataclass(slots=True)
class RequestTrace:
    """One request's life for the request_start / request_finish events."""

    id: str
    model: str
    prompt_tokens: int
    n: int
    max_tokens: int | None
    arrival: float  # time.monotonic()
    first_token: float | None = None
    last_token: float | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    finish_reasons: dict[int, str] = field(default_factory=dict)

    def start(self) -> dict:
        return {"request_id": self.id, "model": self.model, "prompt_tokens": self.prompt_tokens, "n": self.n,
                "max_tokens": self.max_tokens}

    def observe(self, token_ids: int, cached_tokens: int, index: int, finish_reason: str | None) -> None:
        if token_ids:
            now = time.monotonic()
            self.first_token = self.first_token or now
            self.last_token = now
            self.output_tokens += token_ids
        self.cached_tokens = max(self.cached_tokens, cached_tokens)
        if finish_reason is not None:
            self.finish_reasons[index] = finish_reason

    def finish(self, status: str) -> dict:
        """status: finished | aborted | error. tok_s is the decode rate after the first token."""
        end = time.monotonic()
        reasons = [self.finish_reasons.get(i, "abort" if status != "finished" else "stop") for i in range(self.n)]
        decode_time = (self.last_token - self.first_token) if self.first_token else 0.0
        tok_s = (self.output_tokens - self.n) / decode_time if decode_time > 0 and self.output_tokens > self.n else 0.0
        return {
            **self.start(),
            "status": status,
            "finish_reason": reasons[0],
            "finish_reasons": reasons,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "ttft": round(self.first_token - self.arrival, 6) if self.first_token else None,
            "duration": round(end - self.arrival, 6),
            "tok_s": round(tok_s, 3),
        }
