"""The capturing proxy itself, against a stand-in upstream: it streams chunk by chunk, records
SSE and its first content, and hangs up on the server when the client does."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.clients.proxy import CapturingProxy, carries_content


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hung_up = threading.Event()

    def log_message(self, *args) -> None:
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/slow":  # silent, as during a long prefill, until the proxy hangs up
            while not self.hung_up.is_set():
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        self.hung_up.set()
                except OSError:
                    self.hung_up.set()
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for event in ({"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
                      {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}):
            chunk = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            time.sleep(0.2)
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_streams_and_records(upstream, tmp_path):
    with CapturingProxy(upstream, log=tmp_path / "log.jsonl") as proxy:
        with httpx.stream("POST", proxy.url + "/v1/messages?beta=true", json={"a": 1},
                          headers={"x-app": "cli"}) as r:
            chunks = list(r.iter_raw())
        proxy.wait_idle()
    assert len(chunks) >= 2  # streamed through, not buffered
    (ex,) = proxy.exchanges
    assert (ex.method, ex.path, ex.query, ex.body, ex.status) == ("POST", "/v1/messages", {"beta": ["true"]}, {"a": 1}, 200)
    assert ex.headers["x-app"] == "cli"
    assert [e["type"] for e in ex.events()] == ["message_start", "content_block_delta"]
    assert 0.15 < ex.ttft < 5  # the delta, not message_start
    assert json.loads((tmp_path / "log.jsonl").read_text())["status"] == 200


def test_client_hang_up_reaches_the_server(upstream):
    Upstream.hung_up.clear()
    with CapturingProxy(upstream) as proxy:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(proxy.url + "/slow", json={}, timeout=0.5)
        assert Upstream.hung_up.wait(5)
        proxy.wait_idle(5)
    assert "client went away" in proxy.exchanges[0].error


def test_carries_content():
    assert carries_content({"type": "response.output_text.delta", "delta": "x"})
    assert carries_content({"choices": [{"delta": {"content": "x"}}]})
    assert not carries_content({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    assert not carries_content({"type": "message_start"})
