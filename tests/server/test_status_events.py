"""GET /api/status, the /api/events stream and the store/job routes, against a real
`localserve up` (a tiny random model with an API key), plus the in-process EventBus."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests.server.conftest import start_server
from tests.tui.helpers import TINY_UP_ARGS, EventReader, SlowFileServer, big_gguf_bytes, write_tiny_gguf

KEY = "monitor-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv(localserve_home, tmp_path_factory):
    # a data dir of its own: its pull jobs must not leave blobs or partial files in the store
    # other tests look at
    s = start_server([*TINY_UP_ARGS, "--api-key", KEY], tmp_path_factory.mktemp("monitor") / "up.log",
                     env={"LOCALSERVE_HOME": str(tmp_path_factory.mktemp("monitor_home"))})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("files") / "statmodel-Q8_0.gguf")


def complete(srv, **body) -> dict:
    r = httpx.post(srv.url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def wait_job(srv, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{srv.url}/api/jobs/{job_id}", headers=AUTH).json()
        if job["state"] != "running":
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still running")


def model_names(srv) -> list[str]:
    return [m["name"] for m in httpx.get(srv.url + "/api/models", headers=AUTH, timeout=60).json()["models"]]


# -- status -------------------------------------------------------------------------------


def test_status_reports_the_served_model(srv):
    complete(srv)
    s = httpx.get(srv.url + "/api/status").json()  # open without a key, like /health and /metrics
    assert s["status"] == "ready" and s["version"] and s["uptime_s"] > 0
    (m,) = s["models"]
    assert m["name"] == "random:tiny-llama" and m["backend"] == "cpu" and m["device"]
    assert m["architecture"] == "llama" and 0 < m["context"] <= m["model_context"]
    assert m["memory"]["weights_bytes"] > 0 and m["memory"]["kv_bytes"] > 0
    assert m["memory"]["kv_bytes"] == m["kv"]["capacity_tokens"] * m["memory"]["kv_bytes_per_token"]
    assert m["kv"]["pages_total"] > 0 and 0.0 <= m["kv"]["usage"] <= 1.0
    assert m["running"] == 0 and m["queued"] == 0 and m["limits"]["max_running"] == 4
    assert 0.0 <= m["prefix_cache"]["hit_rate"] <= 1.0
    assert m["tokens"]["generated"] >= 5 and s["requests"]["finished"]["finished"] >= 1


def test_status_counts_a_running_request(srv):
    body = {"prompt": [1, 2, 3], "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers=AUTH) as c, c.stream("POST", srv.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        m = httpx.get(srv.url + "/api/status").json()["models"][0]
        assert m["running"] + m["queued"] == 1 and m["kv"]["pages_used"] > 0


# -- events -------------------------------------------------------------------------------


def test_finished_request_event_has_tokens_and_finish_reason(srv):
    with EventReader(srv.url) as ev:
        out = complete(srv, max_tokens=7)
        start = ev.wait(lambda e: e["type"] == "request_start")
        done = ev.wait(lambda e: e["type"] == "request_finish")
    assert start["prompt_tokens"] == 3 and start["max_tokens"] == 7
    assert done["request_id"] == start["request_id"] and done["model"] == "random:tiny-llama"
    assert done["status"] == "finished" and done["finish_reason"] == "length" == out["choices"][0]["finish_reason"]
    assert done["output_tokens"] == 7 == out["usage"]["completion_tokens"] and done["prompt_tokens"] == 3
    assert 0 < done["ttft"] <= done["duration"] and done["tok_s"] > 0


def test_aborted_request_event(srv):
    body = {"prompt": [4, 5, 6], "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    with EventReader(srv.url, types="request_finish") as ev:
        with httpx.Client(timeout=60, headers=AUTH) as c, c.stream("POST", srv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        done = ev.wait(lambda e: e["type"] == "request_finish")
    assert done["status"] == "aborted" and done["finish_reason"] == "abort"
    assert 0 < done["output_tokens"] < 1500


def test_stats_every_second_and_type_filter(srv):
    with EventReader(srv.url, types="stats") as ev:
        complete(srv, max_tokens=200)
        t0 = time.monotonic()
        first = ev.wait(lambda e: True)
        second = ev.wait(lambda e: True)
        assert time.monotonic() - t0 < 5
    for s in (first, second):
        assert s["type"] == "stats" and s["model"] == "random:tiny-llama"
        assert {"running", "waiting", "queue_peak", "kv", "prefix_hit_rate", "prefix_hit_rate_recent",
                "tok_s"} <= set(s)
        assert 0.0 <= s["kv"]["usage"] <= 1.0 and s["tok_s"] >= 0
    assert 0.5 < second["time"] - first["time"] < 2.0
    assert max(first["generated_tokens"], second["generated_tokens"]) >= 200


def test_stats_show_load_while_requests_run(srv):
    body = {"prompt": [7, 8, 9], "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    with EventReader(srv.url, types="stats") as ev:
        with httpx.Client(timeout=60, headers=AUTH) as c, c.stream("POST", srv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            busy = ev.wait(lambda e: e["queue_peak"] >= 1 and e["tok_s"] > 0, timeout=10)
    assert busy["kv_usage_peak"] > 0


# -- store routes and jobs ----------------------------------------------------------------


def test_store_routes_need_the_key(srv):
    assert httpx.get(srv.url + "/api/models").status_code == 401
    assert httpx.post(srv.url + "/api/pull", json={"ref": "x/y"}).status_code == 401
    assert httpx.get(srv.url + "/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_pull_quantize_delete_through_jobs(srv, tiny_file):
    with EventReader(srv.url, types="job", headers=AUTH) as ev:
        r = httpx.post(srv.url + "/api/pull", headers=AUTH, json={"ref": str(tiny_file)}, timeout=60)
        assert r.status_code == 202, r.text
        job = ev.wait(lambda e: e["id"] == r.json()["id"] and e["state"] != "running")
    assert job["state"] == "done" and job["result"]["name"] == "statmodel:Q8_0"
    if job["total"] is not None:  # None: the store already held these bytes (an earlier test's blob)
        assert job["done"] == job["total"] == tiny_file.stat().st_size
    assert "statmodel:Q8_0" in model_names(srv)

    d = httpx.get(srv.url + "/api/models/statmodel:Q8_0", headers=AUTH).json()
    assert d["architecture"] == "mistral" and d["num_layers"] == 2 and d["fits"] is True

    est = httpx.get(srv.url + "/api/quantize/estimate", headers=AUTH,
                    params={"source": "statmodel:Q8_0", "target": "Q4_0"}).json()
    r = httpx.post(srv.url + "/api/quantize", headers=AUTH, json={"source": "statmodel:Q8_0", "target": "q4_0"})
    assert r.status_code == 202, r.text
    job = wait_job(srv, r.json()["id"])
    assert job["state"] == "done", job
    assert job["result"]["name"] == "statmodel:Q8_0-Q4_0" and job["unit"] == "weights" and job["done"] == job["total"]
    # the estimate is the real size up to the file's alignment padding
    assert abs(est["estimated_bytes"] - job["result"]["size"]) <= 0.02 * job["result"]["size"]
    assert est["estimated_bytes"] < est["source_bytes"]

    for name in ("statmodel:Q8_0-Q4_0", "statmodel:Q8_0"):
        r = httpx.delete(f"{srv.url}/api/models/{name}", headers=AUTH)
        assert r.status_code == 200 and r.json()["deleted"] == name
    assert not {"statmodel:Q8_0", "statmodel:Q8_0-Q4_0"} & set(model_names(srv))


def test_store_route_errors(srv):
    names = model_names(srv)
    r = httpx.delete(srv.url + "/api/models/gemma3:270m", headers=AUTH)
    assert r.status_code == 400 and "embedded default" in r.json()["error"]["message"]
    assert httpx.delete(srv.url + "/api/models/nope:latest", headers=AUTH).status_code == 404
    assert httpx.get(srv.url + "/api/models/nope:latest", headers=AUTH).status_code == 404
    r = httpx.post(srv.url + "/api/pull", headers=AUTH, json={"ref": "/no/such/file.gguf"})
    assert r.status_code == 400 and "no such file" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/api/quantize", headers=AUTH, json={"source": "gemma3:270m", "target": "Q9_9"})
    assert r.status_code == 400 and "supported" in r.json()["error"]["message"]
    assert httpx.post(srv.url + "/api/pull", headers=AUTH, json={}).status_code == 400
    assert httpx.get(srv.url + "/api/jobs/pull-999", headers=AUTH).status_code == 404
    assert model_names(srv) == names


def test_cancelled_pull_leaves_the_store_unchanged(srv, tiny_file):
    # huggingface_hub reports progress per 10 MiB chunk: the file spans three of them
    files = SlowFileServer({"padded-Q8_0.gguf": big_gguf_bytes(tiny_file, pad_mb=24)}, rate=5_000_000)
    try:
        names = model_names(srv)
        r = httpx.post(srv.url + "/api/pull", headers=AUTH, json={"ref": files.url + "/padded-Q8_0.gguf"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 30
        while httpx.get(f"{srv.url}/api/jobs/{job_id}", headers=AUTH).json()["done"] == 0:
            assert time.monotonic() < deadline, "the pull made no progress"
            time.sleep(0.05)
        assert httpx.delete(f"{srv.url}/api/jobs/{job_id}", headers=AUTH).json()["state"] in ("running", "cancelled")
        job = wait_job(srv, job_id)
        assert job["state"] == "cancelled" and 0 < job["done"] < job["total"]
        assert model_names(srv) == names
    finally:
        files.stop()


# -- the bus itself -----------------------------------------------------------------------


def test_event_bus_fans_out_across_threads_and_drops_oldest():
    from localserve.server.events import EventBus

    async def main():
        bus = EventBus(queue_size=3)
        everything, only_jobs = bus.subscribe(), bus.subscribe(frozenset({"job"}))
        t = threading.Thread(target=lambda: [bus.publish("stats", n=i) for i in range(5)] + [bus.publish("job", n=9)])
        t.start()
        t.join()
        await asyncio.sleep(0.05)  # the publishes land through call_soon_threadsafe
        got = [everything.queue.get_nowait().data["n"] for _ in range(everything.queue.qsize())]
        jobs = [only_jobs.queue.get_nowait().type for _ in range(only_jobs.queue.qsize())]
        bus.unsubscribe(everything)
        bus.publish("job", n=10)
        await asyncio.sleep(0.05)
        return got, everything.dropped, jobs, everything.queue.qsize(), [e.type for e in bus.recent()]

    got, dropped, jobs, left, recent = asyncio.run(main())
    assert got == [3, 4, 9] and dropped == 3
    assert jobs == ["job"] and left == 0
    assert recent == ["job", "job"]  # stats are not kept in the recent history


@pytest.mark.slow
def test_the_served_default_is_marked_in_the_store(server):
    """The embedded default is served from the runtime's file; the store holds it as a hard link."""
    models = {m["name"]: m for m in httpx.get(server.url + "/api/models", timeout=120).json()["models"]}
    assert models["gemma3:270m"]["served"] and models["gemma3:270m"]["default"]
    assert not any(m["served"] for name, m in models.items() if name != "gemma3:270m")
    s = httpx.get(server.url + "/api/status").json()["models"][0]
    assert s["architecture"] == "gemma3" and s["memory"]["weights_file_bytes"] == models["gemma3:270m"]["size"]
