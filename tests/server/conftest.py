"""Real `localserve up` processes on free 127.0.0.1 ports, shared per test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(args: list[str], log: Path, env: dict | None = None, ready_timeout: float = 300) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "localserve", "up", *args, "--port", str(port)]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"localserve up exited with {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"localserve up was not ready in {ready_timeout} s:\n{server.output()}")


@pytest.fixture(scope="session")
def server(default_gguf, tmp_path_factory):
    """The embedded default model, started the way the README starts it (no MODEL argument)."""
    log = tmp_path_factory.mktemp("server") / "up.log"
    # room for 4 sequences and no queue: the capacity test fills it with one n=4 request; a
    # small default max_tokens for requests that set none (test_agent_wire)
    srv = start_server(["--max-running", "4", "--max-queued", "0", "--threads", "2", "--max-tokens-default", "24"],
                       log)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
    """A random tiny model (no tokenizer) with an API key: auth tests without disturbing the main
    server."""
    log = tmp_path_factory.mktemp("tiny_server") / "up.log"
    srv = start_server(["random:tiny-llama", "--api-key", "sekret", "--threads", "1"], log)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
