"""A capturing reverse proxy between a client and `localserve up`: forwards every request, streams
the answer back chunk by chunk as it arrives, and records the exchange (request line, headers,
JSON body, status, response headers and body, SSE included) with the times the first response
byte and the first byte that carries generated content went out."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# hop-by-hop headers are the proxy's own business; accept-encoding is dropped so that the
# recorded response bodies are plain text (the server would answer uncompressed anyway)
_HOP_REQUEST = {"host", "connection", "keep-alive", "transfer-encoding", "accept-encoding", "content-length"}
_HOP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Exchange:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # as the client sent them, names lower-cased
    body: object  # parsed JSON, else text, else None
    started: float  # time.monotonic() once the request body was read
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    response: bytes = b""
    first_byte: float | None = None
    first_content: float | None = None  # the first chunk that carries generated text or tool input
    finished: float | None = None
    error: str | None = None  # the forward failed or the client went away

    @property
    def text(self) -> str:
        return self.response.decode("utf-8", errors="replace")

    @property
    def is_sse(self) -> bool:
        return self.response_headers.get("content-type", "").startswith("text/event-stream")

    def events(self) -> list[dict]:
        """The JSON payloads of the SSE `data:` lines (`[DONE]` left out), or the JSON body."""
        if not self.is_sse:
            try:
                return [json.loads(self.response)] if self.response else []
            except ValueError:
                return []
        return [e for e in parse_sse(self.text) if isinstance(e, dict)]

    @property
    def answered(self) -> bool:
        """Did the whole answer come through? A non-stream body, or a stream up to its last event
        (a client may hang up right after that event, before the stream's own end)."""
        if not self.is_sse:
            return self.status != 0 and self.error is None
        for event in reversed(self.events()):
            if event.get("type") in ("message_stop", "response.completed", "response.incomplete", "response.failed"):
                return True
            if any(c.get("finish_reason") for c in event.get("choices") or []):
                return True
        return False

    @property
    def ttft(self) -> float | None:
        """Seconds from the request to the first response chunk that carries content."""
        return None if self.first_content is None else self.first_content - self.started

    def summary(self, limit: int = 4000) -> str:
        """The exchange as a failure message wants it: the request without its long texts, the
        whole response up to `limit` characters."""
        return (f"{self.method} {self.path} -> {self.status}{' (' + self.error + ')' if self.error else ''}\n"
                f"  request headers: {json.dumps(self.headers)}\n"
                f"  request body: {json.dumps(shorten(self.body))[:limit]}\n"
                f"  response headers: {json.dumps(self.response_headers)}\n"
                f"  response: {self.text if len(self.text) <= limit else self.text[:limit // 2] + ' ... ' + self.text[-limit // 2:]}")

    def to_json(self) -> dict:
        return {"method": self.method, "path": self.path, "query": self.query, "headers": self.headers,
                "body": self.body, "status": self.status, "response_headers": self.response_headers,
                "response": self.text, "ttft_s": self.ttft, "error": self.error,
                "elapsed_s": None if self.finished is None else self.finished - self.started}


def shorten(value: object, keep: int = 160) -> object:
    """A JSON value with every long string cut to `keep` characters (and its length noted)."""
    if isinstance(value, str):
        return value if len(value) <= keep else f"{value[:keep]}...<{len(value)} chars>"
    if isinstance(value, list):
        return [shorten(v, keep) for v in value]
    if isinstance(value, dict):
        return {k: shorten(v, keep) for k, v in value.items()}
    return value


def parse_sse(text: str) -> list[object]:
    out: list[object] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in block.split("\n") if line.startswith("data:"))
        if not data or data == "[DONE]":
            continue
        try:
            out.append(json.loads(data))
        except ValueError:
            out.append(data)
    return out


def carries_content(event: object) -> bool:
    """Does this streamed event carry generated output? Anthropic content_block_delta, a Responses
    `*.delta` event, or a chat-completions chunk with content, reasoning or tool-call text."""
    if not isinstance(event, dict):
        return False
    kind = event.get("type")
    if kind == "content_block_delta" or (isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".delta")):
        return True
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or choice.get("message") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls") or choice.get("text"):
            return True
    return False


class _ContentWatch:
    """Finds the first SSE event that carries content while the chunks stream through."""

    def __init__(self, sse: bool):
        self.sse, self.buffer, self.found = sse, "", False

    def feed(self, chunk: bytes) -> bool:
        if self.found:
            return False
        if not self.sse:
            self.found = True
            return True
        self.buffer += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
        *complete, self.buffer = self.buffer.split("\n\n")
        if any(carries_content(e) for e in parse_sse("\n\n".join(complete))):
            self.found = True
        return self.found


class CapturingProxy:
    """`with CapturingProxy(upstream_url) as proxy:` serves on proxy.url; proxy.exchanges grows as
    requests finish (in the order they were received); `mark()` / `since(mark)` cut out a turn."""

    def __init__(self, upstream: str, port: int = 0, log: Path | None = None):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.log = log
        self._lock = threading.Lock()
        self._all: list[Exchange] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._all)

    def mark(self) -> int:
        with self._lock:
            return len(self._all)

    def since(self, mark: int) -> list[Exchange]:
        with self._lock:
            return list(self._all[mark:])

    def wait_idle(self, timeout: float = 30) -> None:
        """Until every recorded exchange has finished (a client may exit before its last
        response has been fully streamed through)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(e.finished is None for e in self.exchanges):
            time.sleep(0.05)

    def __enter__(self) -> CapturingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, ex: Exchange) -> None:
        with self._lock:
            self._all.append(ex)

    def _finish(self, ex: Exchange) -> None:
        ex.finished = time.monotonic()
        if self.log is not None:
            with self._lock, open(self.log, "a") as f:
                f.write(json.dumps(ex.to_json()) + "\n")

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("content-length") or 0)
                return self.rfile.read(n) if n else b""

            def _forward(self) -> None:
                raw = self._read_body()
                try:
                    body: object = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", errors="replace")
                split = urlsplit(self.path)
                ex = Exchange(self.command, split.path, parse_qs(split.query, keep_blank_values=True),
                              {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
                proxy._record(ex)
                try:
                    self._relay(ex, raw)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    ex.error = ex.error or f"client went away: {exc!r}"
                    self.close_connection = True
                except Exception as exc:  # noqa: BLE001 - recorded, the client sees a 502
                    self.close_connection = True
                    if ex.error:  # the watcher hung up on the server for a client that left
                        return
                    ex.error = f"proxy error: {exc!r}"
                    if ex.status == 0:
                        try:
                            self.send_error(502, "capture proxy: upstream failed")
                        except OSError:
                            pass
                finally:
                    proxy._finish(ex)

            def _relay(self, ex: Exchange, raw: bytes) -> None:
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=3600)
                done = threading.Event()
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_REQUEST}
                    headers["Content-Length"] = str(len(raw))
                    conn.request(self.command, self.path, body=raw or None, headers=headers)
                    threading.Thread(target=self._watch_client, args=(ex, conn, done), daemon=True).start()
                    resp = conn.getresponse()
                    ex.status = resp.status
                    ex.response_headers = {k.lower(): v for k, v in resp.getheaders()}
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_RESPONSE:
                            self.send_header(k, v)
                    bodiless = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
                    if bodiless:
                        if "content-length" in ex.response_headers:
                            self.send_header("Content-Length", ex.response_headers["content-length"])
                        self.end_headers()
                        self.wfile.flush()
                        ex.first_byte = time.monotonic()
                        return
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.flush()
                    watch = _ContentWatch(ex.is_sse)
                    got = bytearray()
                    while chunk := resp.read1(65536):
                        now = time.monotonic()
                        ex.first_byte = ex.first_byte or now
                        if watch.feed(chunk):
                            ex.first_content = now
                        got += chunk
                        ex.response = bytes(got)
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                finally:
                    done.set()
                    conn.close()  # on a client that went away this also ends the server's request

            def _watch_client(self, ex: Exchange, conn: http.client.HTTPConnection, done: threading.Event) -> None:
                """A client that hangs up while the server is still silent (a long prefill) is only
                noticed on the next write; watch its socket instead, and hang up on the server too,
                so that the server cancels the request as it would for the client itself."""
                sock = self.connection
                while not done.is_set():
                    try:
                        readable, _, _ = select.select([sock], [], [], 0.2)
                        if not readable:
                            continue
                        if sock.recv(1, socket.MSG_PEEK):
                            return  # the client sent more (not a hang-up): nothing to watch
                    except (OSError, ValueError):
                        pass
                    if not done.is_set():
                        ex.error = "client went away before the answer was complete"
                        try:
                            conn.sock.shutdown(socket.SHUT_RDWR)
                        except (OSError, AttributeError):
                            pass
                    return

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _forward

        return Handler
