"""`localserve up --engine-process on`: the engine core in a process of its own, driven through
a real server on a tiny random model (token-id prompts). Same tokens as the engine in the
server's process; a disconnect frees the pages across the boundary; a refused request keeps its
HTTP status; SIGTERM stops both processes, a killed server does not orphan the engine; a dead
engine process fails the open streams with an error (not a hang) and ends the server with
status 1, for a supervisor to start it again."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from tests.server.conftest import start_server
from tests.server.test_lifecycle import metric, wait_for

pytestmark = pytest.mark.slow

MODEL = "random:tiny-llama"
PROMPT = [1, 17, 123, 4, 88, 301, 12, 5]  # the tiny model has 512 tokens


def start(tmp_path, mode: str, name: str):
    return start_server([MODEL, "--engine-process", mode, "--threads", "1", "--max-running", "4"],
                        tmp_path / f"{name}.log")


def engine_pid(server) -> int:
    return httpx.get(server.url + "/api/status").json()["models"][0]["engine_pid"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def complete(server, **kw) -> httpx.Response:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, **kw}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


@pytest.fixture(scope="module")
def core_server(tmp_path_factory):
    srv = start(tmp_path_factory.mktemp("core"), "on", "up")
    yield srv
    srv.stop()


def test_engine_runs_in_its_own_process_with_the_same_tokens(core_server, tmp_path):
    pid = engine_pid(core_server)
    assert pid != core_server.proc.pid and alive(pid)
    assert f"engine process {pid}" in core_server.output()
    here = start(tmp_path, "off", "inproc")
    try:
        assert engine_pid(here) == here.proc.pid
        ids = [complete(s, logprobs=1).json()["choices"][0]["logprobs"]["tokens"] for s in (core_server, here)]
        assert ids[0] == ids[1] and len(ids[0]) == 24
    finally:
        here.stop()


def test_refusals_keep_their_status_across_the_boundary(core_server):
    r = complete(core_server, prompt=list(range(1, 500)) * 10)
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = complete(core_server, prompt=[10**9])
    assert r.status_code == 400
    r = complete(core_server, stream=True, max_tokens=4)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def test_disconnect_frees_pages_in_the_engine_process(core_server):
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", core_server.url + "/v1/completions", json={
                "model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(4)]
            assert wait_for(lambda: metric(core_server, "localserve_kv_pages_used") > 0)
    assert wait_for(lambda: metric(core_server, "localserve_kv_pages_used") == 0
                    and metric(core_server, "localserve_requests_running") == 0)


def test_sigterm_stops_both_processes(tmp_path):
    srv = start(tmp_path, "on", "term")
    pid = engine_pid(srv)
    assert srv.stop(signal.SIGTERM) == 0
    assert wait_for(lambda: not alive(pid), timeout=15), "the engine process outlived the server"


def test_engine_death_fails_open_streams_and_stops_the_server(tmp_path):
    srv = start(tmp_path, "on", "death")
    pid = engine_pid(srv)
    events: list[str] = []
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/completions", json={
                "model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        os.kill(pid, signal.SIGKILL)
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert errors and errors[0]["code"] == "engine_dead", events[-3:]
    assert srv.proc.wait(30) == 1
    assert "engine process exited unexpectedly" in srv.output()


def test_a_killed_server_does_not_orphan_the_engine(tmp_path):
    srv = start(tmp_path, "on", "orphan")
    pid = engine_pid(srv)
    srv.stop(signal.SIGKILL)
    assert wait_for(lambda: not alive(pid), timeout=15), "the engine process outlived a killed server"

