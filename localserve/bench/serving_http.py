"""The serving benchmark's HTTP clients: the built-in one, HTTP/1.1 on asyncio Protocols for
thousands of concurrent event streams at a few microseconds of CPU an event, and httpx beside it
(`--http-client httpx`) as a check.

A general-purpose client pays tens to hundreds of microseconds of Python for each chunk it reads
(httpx: h11's state machine, anyio's stream, an async generator hop each): at 1,000 streams and
15,000+ events a second that is a few cores, and the benchmark would measure its client. Here the
event loop hands data_received whatever the socket holds; the chunked transfer coding is undone
in place and the payload goes straight to the request's SseScan, stamped with one perf_counter()
a read. Connections are kept alive and reused (one idle for at most IDLE_S seconds, well inside
uvicorn's 5 s); a request on a reused connection that the server closed before answering is sent
once more on a new one.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from urllib.parse import urlsplit

from localserve.bench.serving_config import HTTP_CLIENTS
from localserve.bench.serving_metrics import RequestResult
from localserve.bench.serving_sse import SseScan

IDLE_S = 2.0
MAX_HEAD = 64 * 1024
MAX_ERROR_BODY = 4096
perf_counter = time.perf_counter

# what a connection is reading
_HEAD, _CHUNKED, _LENGTH, _UNTIL_CLOSE, _TRAILER, _DONE = range(6)


class Unanswered(ConnectionError):
    """The server closed the connection before the response was whole."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__("the server closed the connection" + (" mid-response" if got_bytes else " before answering"))
        self.got_bytes = got_bytes


class _Conn(asyncio.Protocol):
    """One HTTP/1.1 connection, one request at a time on it."""

    def __init__(self) -> None:
        self.transport = None
        self.closed = False
        self.fut: asyncio.Future | None = None
        self.mode = _DONE
        self.got_bytes = False
        self.idle_since = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.mode == _UNTIL_CLOSE:
            self._finish()
        elif self.fut is not None and not self.fut.done():
            self.fut.set_exception(Unanswered(self.got_bytes))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def begin(self, request: bytes, sink, fut: asyncio.Future) -> None:
        """Send `request`; a 200 response's body goes to sink(bytes, now), fut gets the status."""
        self.sink, self.fut = sink, fut
        self.mode, self.buf, self.left = _HEAD, b"", 0
        self.got_bytes, self.status, self.keep_alive, self.error_body = False, 0, True, bytearray()
        self.transport.write(request)

    def reusable(self) -> bool:
        return self.mode == _DONE and self.keep_alive and not self.closed

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        self.got_bytes = True
        mode = self.mode
        if mode == _CHUNKED:  # the common case: one or more events of a stream
            return self._chunked(data, now)
        if mode == _HEAD:
            buf = self.buf + data
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                if len(buf) > MAX_HEAD:
                    self._fail(ConnectionError("response head too large"))
                return
            self.buf = b""
            self._head(buf[:i])
            data, mode = buf[i + 4:], self.mode
        if mode == _CHUNKED:
            self._chunked(data, now)
        elif mode == _LENGTH:
            take = data[:self.left]
            self.left -= len(take)
            if take:
                self.sink(take, now)
            if self.left == 0:
                self._finish()
        elif mode == _UNTIL_CLOSE:
            if data:
                self.sink(data, now)
        elif mode == _TRAILER:
            self.buf += data
            self._trailer()

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        try:
            self.status = int(parts[1])
        except (IndexError, ValueError):
            return self._fail(ConnectionError(f"not an HTTP response: {lines[0][:80]!r}"))
        chunked, length = False, None
        self.keep_alive = parts[0] != b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding":
                chunked = value.endswith(b"chunked")
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                self.keep_alive = value != b"close" if self.keep_alive else value == b"keep-alive"
        if self.status != 200:
            self.sink = self._keep_error
        if chunked:
            self.mode, self.left = _CHUNKED, 0
        elif length is not None or self.status in (204, 304):
            self.mode, self.left = _LENGTH, length or 0
            if self.left == 0:
                self._finish()
        else:
            self.mode, self.keep_alive = _UNTIL_CLOSE, False

    def _chunked(self, data: bytes, now: float) -> None:
        """The chunked transfer coding undone: self.left > 0, payload bytes of the chunk still to
        come; -2, its closing CRLF; 0, a size line."""
        if self.left == 0 and not self.buf:  # the common case: one whole chunk, one event
            i = data.find(b"\r\n", 0, 18)
            try:
                end = i + 2 + int(data[:i], 16) if i > 0 else -1
            except ValueError:  # a chunk extension, or not a size: the full path says which
                end = -1
            if end > i + 2 and len(data) == end + 2:
                return self.sink(data[i + 2:end], now)
        buf = self.buf + data if self.buf else data
        n, pos, out = len(buf), 0, []
        while pos < n:
            left = self.left
            if left > 0:
                end = pos + left
                if end <= n:
                    out.append(buf[pos:end])
                    pos, self.left = end, -2
                else:
                    out.append(buf[pos:])
                    pos, self.left = n, end - n
            elif left == -2:
                if n - pos < 2:
                    break
                pos, self.left = pos + 2, 0
            else:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                try:
                    size = int(buf[pos:i].split(b";", 1)[0], 16)
                except ValueError:
                    return self._fail(ConnectionError(f"bad chunk size line {buf[pos:i][:40]!r}"))
                pos = i + 2
                if size == 0:
                    self.mode = _TRAILER
                    break
                self.left = size
        self.buf = buf[pos:]
        if out:
            self.sink(out[0] if len(out) == 1 else b"".join(out), now)
        if self.mode == _TRAILER:
            self._trailer()

    def _trailer(self) -> None:
        buf = self.buf
        if buf.startswith(b"\r\n") or b"\r\n\r\n" in buf:
            self.buf = b""
            self._finish()

    def _keep_error(self, data: bytes, now: float) -> None:
        if len(self.error_body) < MAX_ERROR_BODY:
            self.error_body += data

    def _finish(self) -> None:
        self.mode = _DONE
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(self.status)

    def _fail(self, exc: Exception) -> None:
        self.mode, self.keep_alive = _DONE, False
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(exc)
        self.close()


class BuiltinSender:
    """POSTs each request body to one path of one server and streams the response into an SseScan."""

    def __init__(self, job, pool: int) -> None:
        u = urlsplit(job.base_url)
        https = u.scheme == "https"
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (443 if https else 80)
        self.ssl = ssl.create_default_context() if https else None
        self.chat, self.timeout = job.chat, job.timeout_s
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = u.path.rstrip("/") + job.path
        headers = {"Host": f"{host}:{self.port}", "Content-Type": "application/json", "Accept": "text/event-stream",
                   "User-Agent": "localserve-bench", **job.headers}
        self.head = f"POST {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        self.idle: list[_Conn] = []
        self.open: set[_Conn] = set()

    async def send(self, body: bytes, rec: RequestResult) -> SseScan:
        scan = SseScan(rec, self.chat)
        request = self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        loop = asyncio.get_running_loop()
        rec.start = perf_counter()
        for attempt in (0, 1):
            conn = self._idle()
            reused = conn is not None
            if conn is None:
                _, conn = await loop.create_connection(_Conn, self.host, self.port, ssl=self.ssl)
                self.open.add(conn)
            fut = loop.create_future()
            conn.begin(request, scan.feed, fut)
            try:
                status = await asyncio.wait_for(fut, self.timeout)
            except Unanswered as exc:
                self._drop(conn)
                if reused and attempt == 0 and not exc.got_bytes:
                    continue  # the server had closed the idle connection: once more, on a new one
                raise
            except BaseException:
                self._drop(conn)
                raise
            break
        if conn.reusable():
            conn.idle_since = perf_counter()
            self.idle.append(conn)
        else:
            self._drop(conn)
        if status != 200:
            rec.error = f"HTTP {status}: {conn.error_body.decode(errors='replace')[:300]}"
        return scan

    def _idle(self) -> _Conn | None:
        now = perf_counter()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_S:
                return conn
            self._drop(conn)
        return None

    def _drop(self, conn: _Conn) -> None:
        conn.close()
        self.open.discard(conn)

    async def close(self) -> None:
        for conn in list(self.open):
            self._drop(conn)
        self.idle.clear()
        await asyncio.sleep(0)  # the transports close on the next turn of the loop


class HttpxSender:
    """httpx's connection pool scans its connections for every request (work that grows with the
    square of the streams in flight): requests are spread over pools of at most SHARD connections."""

    SHARD = 32

    def __init__(self, job, pool: int) -> None:
        import httpx

        self.path, self.chat = job.path, job.chat
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **job.headers}
        shards = max(1, math.ceil(pool / self.SHARD))
        size = math.ceil(pool / shards)
        self.clients = [httpx.AsyncClient(
            base_url=job.base_url, http1=True, http2=False, trust_env=False,
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            timeout=httpx.Timeout(job.timeout_s, connect=60.0)) for _ in range(shards)]
        self.next = 0

    async def send(self, body: bytes, rec: RequestResult) -> SseScan:
        scan = SseScan(rec, self.chat)
        client = self.clients[self.next % len(self.clients)]
        self.next += 1
        rec.start = perf_counter()
        async with client.stream("POST", self.path, content=body, headers=self.headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                rec.error = f"HTTP {r.status_code}: {text[:300]}"
                return scan
            async for data in r.aiter_raw():
                scan.feed(data, perf_counter())
        return scan

    async def close(self) -> None:
        for c in self.clients:
            await c.aclose()


def sender(name: str, job, pool: int):
    if name not in HTTP_CLIENTS:
        raise ValueError(f"unknown HTTP client {name!r}; choose from {', '.join(HTTP_CLIENTS)}")
    return (HttpxSender if name == "httpx" else BuiltinSender)(job, pool)
