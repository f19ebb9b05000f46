"""Disconnects free their pages, queue limits answer 429, API keys, CORS, graceful shutdown."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.server.conftest import start_server

pytestmark = pytest.mark.slow

MODEL = "gemma3:270m"


def metric(server, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_stream_disconnect_frees_pages(server):
    aborted = metric(server, "localserve_requests_total", status="aborted") if _has(server, "aborted") else 0
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert metric(server, "localserve_kv_pages_used") > 0
        # leaving the block closes the connection mid-stream
    assert wait_for(lambda: metric(server, "localserve_kv_pages_used") == 0
                    and metric(server, "localserve_requests_running") == 0)
    assert wait_for(lambda: metric(server, "localserve_requests_total", status="aborted") == aborted + 1)


def test_non_streaming_disconnect_frees_pages(server):
    aborted = metric(server, "localserve_requests_total", status="aborted") if _has(server, "aborted") else 0
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=2.0))
    assert wait_for(lambda: metric(server, "localserve_requests_total", status="aborted") == aborted + 1)
    assert wait_for(lambda: metric(server, "localserve_kv_pages_used") == 0)


def _has(server, status: str) -> bool:
    try:
        metric(server, "localserve_requests_total", status=status)
        return True
    except KeyError:
        return False


def test_api_key_required(tiny_server):
    url = tiny_server.url + "/v1/completions"
    body = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}
    r = httpx.post(url, json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "invalid api key" in r.json()["error"]["message"].lower()
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert httpx.post(url, json=body, headers={"x-api-key": "sekret"}).status_code == 200
    # health and metrics stay open for probes
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=tiny_server.base_url, api_key="sekret", max_retries=0)
    assert client.completions.create(model="random:tiny-llama", prompt=[1, 2], max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny_server.base_url, api_key="nope", max_retries=0).models.list()


def test_over_capacity_is_429_with_retry_after(server):
    # the server runs at most 4 sequences and queues none: one n=4 request fills it
    long = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 1000, "n": 4, "temperature": 0,
            "stream": True, "ignore_eos": True}
    small = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=long) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: dropping the iterator would close the connection
            assert next(lines).startswith("data: ")
            assert metric(server, "localserve_sequences_admitted") == 4
            second = c.post(server.url + "/v1/completions", json=small)
            assert second.status_code == 429, second.text
            assert second.headers["retry-after"] == "1"
            assert second.json()["error"]["type"] == "rate_limit_error"
    # once the first has gone (its client left), the server serves again
    assert wait_for(lambda: httpx.post(server.url + "/v1/completions", json=small).status_code == 200)
    assert metric(server, "localserve_requests_total", status="overloaded") >= 1


def test_cors_allows_localhost_origins_only(tiny_server):
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(tiny_server.url + "/v1/models", headers={
            "Origin": origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})

    ok = preflight("http://localhost:3000")
    assert ok.status_code in (200, 204) and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    bad = preflight("https://evil.example.com")
    assert bad.headers.get("access-control-allow-origin") != "https://evil.example.com"


def test_loading_answers_503_then_graceful_shutdown(tmp_path):
    # /health is 503 until the model has loaded; SIGTERM then stops the server cleanly
    srv = start_server(["random:tiny-llama", "--threads", "1"], tmp_path / "up.log")
    try:
        assert httpx.get(srv.url + "/health").json()["status"] == "ready"
        assert "localserve: ready at" in srv.output()
    finally:
        code = srv.stop(signal.SIGTERM, timeout=30)
    assert code == 0, srv.output()
    assert "Traceback" not in srv.output()


@pytest.mark.parametrize("args,words", [(["random:tiny-llama", "--backend", "tpu"], "unknown backend 'tpu'"),
                                        (["/nonexistent/model.gguf"], "/nonexistent/model.gguf")])
def test_a_model_that_cannot_load_ends_the_server(tmp_path, args, words):
    """The reason printed and exit status 1 within seconds, not a server answering 503 forever."""
    import subprocess
    import sys

    from tests.server.conftest import free_port

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "localserve", "up", *args, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert words in out and "failed" in out, out
    assert "Traceback" not in out, out
    assert time.monotonic() - started < 30
