"""One log line per request: method, path, status, model, prompt / cached / generated tokens,
time to first token and duration; a 4xx or 5xx also with its error message, and anything the
server left out of the request (a hosted tool it cannot run, a block it ignored).

The middleware opens a `RequestRecord` for each HTTP request in a context variable; the serving
code fills it (`current()`), and the line is written when the response's last byte is sent, so
a stream is logged when it ends. /v1 requests and every error log at INFO or above; the rest
(health checks, also the 503s of a model still loading, and the monitor's polling) at DEBUG.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from litestar.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("localserve.request")

_MAX_ERROR_BODY = 16 * 1024


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    model: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    first_token: float | None = None  # monotonic time of the first generated token
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def line(self, now: float) -> str:
        parts = [f"{self.method} {self.path} {self.status}"]
        if self.model:
            parts.append(f"model={self.model}")
        if self.prompt_tokens:
            parts.append(f"prompt={self.prompt_tokens} cached={self.cached_tokens} generated={self.generated_tokens}")
        if self.first_token is not None:
            parts.append(f"ttft={self.first_token - self.started:.3f}s")
        parts.append(f"duration={now - self.started:.3f}s")
        text = " ".join(parts)
        if self.notes:
            text += " | " + "; ".join(self.notes)
        if self.error:
            text += f" | error: {self.error}"
        return text


class ClientDisconnected(asyncio.CancelledError):
    """The client went away before its answer began: its work is cancelled and nothing more
    is sent. A cancellation, so that Litestar's handlers for errors leave it alone; the
    middleware logs the request (status 499) and ends it quietly."""


_current: ContextVar[RequestRecord | None] = ContextVar("localserve_request", default=None)


def current() -> RequestRecord | None:
    """The record of the request being served, or None outside one (the engine's tests)."""
    return _current.get()


def note(text: str) -> None:
    """Says in the request's log line that the server left something out or changed it."""
    record = _current.get()
    if record is not None and text not in record.notes:
        record.notes.append(text)


def request_log_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        record = RequestRecord(scope["method"], scope["path"] + (f"?{query}" if query else ""))
        token = _current.set(record)
        body: list[bytes] = []

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body":
                if record.status >= 400 and sum(map(len, body)) < _MAX_ERROR_BODY:
                    body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    _write(record, b"".join(body))
            await send(message)

        try:
            await app(scope, receive, send_logged)
        except ClientDisconnected:
            pass  # logged below as 499
        finally:
            _current.reset(token)
            if record.status == 0:  # the client left before an answer began
                record.status = 499
                _write(record, b"")

    return middleware


def _write(record: RequestRecord, error_body: bytes) -> None:
    if record.status >= 400:
        record.error = record.error or _error_message(error_body)
    api = record.path.startswith("/v1")
    if record.status >= 500 and record.status not in (503, 529):  # 503/529: loading or full, retried
        level = logging.ERROR
    elif record.status >= 400 and (api or record.status != 503):  # a probe of a loading server is no news
        level = logging.WARNING
    else:
        level = logging.INFO if api else logging.DEBUG
    log.log(level, "%s", record.line(time.monotonic()))


def _error_message(body: bytes) -> str | None:
    """The message of an OpenAI- or Anthropic-shaped error body."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace") or None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", ""))
    return str(data.get("detail", ""))[:200] if isinstance(data, dict) else None
