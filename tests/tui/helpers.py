"""Helpers of the monitoring and TUI tests: a reader of /api/events on a thread, a slow HTTP
file server (pulls that run long enough to be watched and cancelled), tiny GGUF files."""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

# a tiny random model, one thread, a small KV pool: quick to start, light on a shared machine
TINY_UP_ARGS = ["random:tiny-llama", "--threads", "1", "--kv-memory", "0.01", "--max-running", "4"]


def write_tiny_gguf(path: Path, quant: str | None = "Q8_0") -> Path:
    """A loadable 2-layer mistral GGUF with random weights (~0.2 MB)."""
    from localserve.models.presets import load_preset
    from tests.models.gguf_writing import write_gguf

    w = load_preset("tiny-mistral")
    q = {n: quant for n in w.tensors if not n.endswith("norm.weight")} if quant else None
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(path, w, quant=q)


class EventReader:
    """Reads a server's /api/events on a thread; `wait(pred)` returns the first event (a dict
    with "type") that matches, consuming the events before it."""

    def __init__(self, url: str, types: str | None = None, headers: dict | None = None) -> None:
        self.url = url
        self.params = {"types": types} if types else {}
        self.headers = headers or {}
        self.events: queue.Queue = queue.Queue()
        self.hello = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(10.0, read=None))
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> "EventReader":
        self._thread.start()
        assert self.hello.wait(30), "no hello event from /api/events"
        return self

    def __exit__(self, *exc) -> None:
        self._client.close()

    def _read(self) -> None:
        kind, data = None, []
        try:
            with self._client.stream("GET", self.url + "/api/events", params=self.params, headers=self.headers) as r:
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        ev = json.loads("\n".join(data))
                        ev.setdefault("type", kind)
                        if kind == "hello":
                            self.hello.set()
                        else:
                            self.events.put(ev)
                        kind, data = None, []
        except (httpx.HTTPError, RuntimeError):
            pass  # closed by __exit__

    def wait(self, pred, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the expected event did not arrive")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if pred(ev):
                return ev


class SlowFileServer:
    """Serves files over HTTP on 127.0.0.1 at `rate` bytes per second (in small chunks)."""

    def __init__(self, files: dict[str, bytes], rate: int = 200_000) -> None:
        self.files, self.rate = files, rate
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                body = outer.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if head:
                    return
                chunk = max(1024, outer.rate // 20)
                try:
                    for i in range(0, len(body), chunk):
                        self.wfile.write(body[i:i + chunk])
                        self.wfile.flush()
                        time.sleep(chunk / outer.rate)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def big_gguf_bytes(tiny: Path, pad_mb: int = 4) -> bytes:
    """A valid GGUF several MB long (tiny-mistral plus a padding tensor): slow to pull."""
    import numpy as np

    from localserve.models.presets import load_preset
    from tests.models.gguf_writing import write_gguf

    pad = np.zeros(((pad_mb << 20) // 4 // 64, 64), dtype=np.float32)
    path = write_gguf(tiny.with_name("padded-mistral-F32.gguf"), load_preset("tiny-mistral"),
                      extra_tensors={"test.padding": pad})
    return path.read_bytes()
