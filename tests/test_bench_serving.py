"""`localserve bench --serving`: the workload generator (lengths, seeds), the metrics maths on
synthetic timings, the SSE scanner and the chunked-transfer decoder on byte streams, and the
client and CLI against a real `localserve up random:tiny-llama` (CPU, one thread)."""

from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np
import pytest

from localserve.bench.serving_client import ClientJob, _split, run_client
from localserve.bench.serving_config import auto_client_procs, parse_length
from localserve.bench.serving_data import poisson_arrivals, sample_lengths, text_prompts, token_prompts
from localserve.bench.serving_http import _Conn
from localserve.bench.serving_metrics import RequestResult, peak_concurrency, summarize
from localserve.bench.serving_sse import SseScan, request_body
from localserve.cli import main
from tests.server.conftest import free_port, start_server

MODEL = "random:tiny-llama"


# -- workload ---------------------------------------------------------------------------------------
def test_parse_length_fixed_and_range():
    assert parse_length("128") == (128, 128)
    assert parse_length("64:256") == (64, 256)
    for bad in ("0", "9:3", "x", "1:y"):
        with pytest.raises(ValueError):
            parse_length(bad)


def test_random_lengths_fixed_and_in_range_and_seeded():
    ins, outs = sample_lengths("random", 50, (128, 128), (7, 7), seed=0)
    assert ins == [128] * 50 and outs == [7] * 50
    ins, outs = sample_lengths("random", 500, (10, 20), (3, 5), seed=1)
    assert min(ins) == 10 and max(ins) == 20 and set(outs) == {3, 4, 5}
    assert sample_lengths("random", 500, (10, 20), (3, 5), seed=1) == (ins, outs)
    assert sample_lengths("random", 500, (10, 20), (3, 5), seed=2) != (ins, outs)


def test_sharegpt_like_lengths_match_the_documented_shape():
    ins, outs = sample_lengths("sharegpt-like", 1000, (1, 1), (1, 1), seed=0)
    ins, outs = np.array(ins), np.array(outs)
    # vLLM's ShareGPT filter, and means near ShareGPT V3's (215 in, ~198 out with a Llama tokenizer)
    assert ins.min() >= 4 and ins.max() <= 1024 and outs.min() >= 4 and (ins + outs).max() <= 2048
    assert 195 <= ins.mean() <= 235 and 180 <= outs.mean() <= 215
    assert np.median(ins) < ins.mean()  # heavy right tail, as ShareGPT's prompts
    again = sample_lengths("sharegpt-like", 1000, (1, 1), (1, 1), seed=0)
    assert again == (ins.tolist(), outs.tolist())


def test_token_prompts_exact_in_vocab_distinct_starts_and_seeded():
    lens = [5, 17, 1, 300]
    ps = token_prompts(lens, 512, seed=0)
    assert [len(p) for p in ps] == lens
    assert all(16 <= t < 512 for p in ps for t in p)
    many = token_prompts([3] * 400, 512, seed=0)
    assert len({p[0] for p in many}) == 400  # no two share a cached prefix
    assert token_prompts(lens, 512, seed=0) == ps and token_prompts(lens, 512, seed=1) != ps


def test_text_prompts_scale_with_words_per_token_and_start_apart():
    ps = text_prompts([100, 100], seed=0)
    assert ps[0].startswith("Request 0:") and ps[1].startswith("Request 1:")
    assert abs(len(ps[0].split()) - 100) <= 2
    assert abs(len(text_prompts([100], seed=0, words_per_token=0.5)[0].split()) - 50) <= 2
    assert text_prompts([100], seed=3) == text_prompts([100], seed=3)


def test_poisson_arrivals_rate_and_offline():
    assert poisson_arrivals(5, math.inf, 0) == [0.0] * 5
    a = poisson_arrivals(4000, 20.0, seed=0)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert 18.0 < len(a) / a[-1] < 22.0
    assert poisson_arrivals(10, 5.0, 1) == poisson_arrivals(10, 5.0, 1)


def test_client_processes_auto_and_the_concurrency_split():
    assert auto_client_procs(1000, None, cores=16) == 2 and auto_client_procs(1000, None, cores=2) == 1
    assert auto_client_procs(5000, 64, cores=64) == 1 and auto_client_procs(5000, None, cores=64) == 10
    job = ClientJob("http://x", "/v1/completions", False, [b""] * 10, [1] * 10, [0.0] * 10, max_concurrency=5)
    parts = [_split(job, k, 3) for k in range(3)]
    assert [p.max_concurrency for p in parts] == [2, 2, 1]  # together exactly the limit
    assert sum(len(p.bodies) for p in parts) == 10 and parts[1].arrivals == job.arrivals[1::3]


# -- metrics ----------------------------------------------------------------------------------------
def _rec(start, times, end, out, prompt=10, expected=None):
    r = RequestResult(expected if expected is not None else out, start, end, list(times), prompt, out)
    r.check(True)
    return r


def test_metrics_on_synthetic_timings():
    # two requests: A sent at 0, tokens at 1.0, 1.1, 1.2, 1.3 (4 tokens, one per chunk), ends 1.3;
    # B sent at 0.5, one chunk of 2 tokens at 2.5, then 2 more at 2.9, 3.0; ends at 3.5 (after usage)
    a = _rec(0.0, [1.0, 1.1, 1.2, 1.3], 1.3, 4, prompt=10)
    b = _rec(0.5, [2.5, 2.9, 3.0], 3.5, 4, prompt=30)
    m = summarize([a, b])
    assert m["completed"] == 2 and m["failed"] == 0
    assert m["duration_s"] == pytest.approx(3.5)
    assert m["total_input_tokens"] == 40 and m["total_output_tokens"] == 8
    assert m["request_throughput"] == pytest.approx(2 / 3.5)
    assert m["output_throughput"] == pytest.approx(8 / 3.5)
    assert m["total_token_throughput"] == pytest.approx(48 / 3.5)
    # TTFT 1.0 and 2.0 s
    assert m["mean_ttft_ms"] == pytest.approx(1500) and m["median_ttft_ms"] == pytest.approx(1500)
    assert m["p99_ttft_ms"] == pytest.approx(1000 + 0.99 * 1000)
    # TPOT: (E2E - TTFT) / (tokens - 1): (1.3 - 1.0) / 3 = 0.1 and (3.0 - 2.0) / 3 = 1/3 s
    assert m["mean_tpot_ms"] == pytest.approx((100 + 1000 / 3) / 2)
    assert m["median_tpot_ms"] == pytest.approx((100 + 1000 / 3) / 2)
    # ITL: 0.1, 0.1, 0.1 from A, 0.4, 0.1 from B: pooled
    itl = np.array([0.1, 0.1, 0.1, 0.4, 0.1]) * 1000
    assert m["mean_itl_ms"] == pytest.approx(itl.mean()) and m["median_itl_ms"] == pytest.approx(100)
    assert m["p99_itl_ms"] == pytest.approx(np.percentile(itl, 99))
    assert m["mean_e2el_ms"] == pytest.approx((1300 + 3000) / 2)
    assert m["p99_e2el_ms"] == pytest.approx(1300 + 0.99 * 1700)
    assert m["mean_concurrency"] == pytest.approx((1.3 + 3.0) / 3.5)
    assert m["peak_concurrency"] == 2


def test_a_one_token_request_has_a_ttft_but_no_tpot_or_itl():
    m = summarize([_rec(0.0, [0.25], 0.3, 1)])
    assert m["mean_ttft_ms"] == pytest.approx(250) and m["mean_tpot_ms"] is None and m["mean_itl_ms"] is None


def test_failures_are_counted_with_their_first_texts():
    ok = _rec(0.0, [0.1, 0.2], 0.2, 2)
    short = _rec(0.0, [0.1], 0.3, 1, expected=2)  # the server stopped early: ignore_eos not honoured
    refused = RequestResult(2, 0.0, 0.05, [], 0, 0, "HTTP 429: the queue is full")
    no_usage = RequestResult(2, 0.0, 0.4, [0.1, 0.2], 0, 0)
    no_usage.check(False)
    m = summarize([ok, short, refused, no_usage])
    assert m["completed"] == 1 and m["failed"] == 3
    texts = [e["error"] for e in m["errors"]]
    assert any("!= max_tokens 2" in t for t in texts) and "HTTP 429: the queue is full" in texts
    assert any("without usage" in t for t in texts)
    assert m["total_output_tokens"] == 2  # failed requests' tokens do not count
    assert summarize([refused])["duration_s"] is None


def test_peak_concurrency_touching_spans_do_not_overlap():
    assert peak_concurrency([(0, 1), (1, 2), (2, 3)]) == 1
    assert peak_concurrency([(0, 3), (1, 2), (1.5, 4)]) == 3


# -- SSE scanning and the chunked transfer coding -----------------------------------------------------
def _completion_chunk(text="x", usage=None, choices=True):
    ch = [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}] if choices else []
    return b"data: " + json.dumps({"id": "c", "choices": ch, "usage": usage}, separators=(",", ":")).encode() + b"\n\n"


COMPLETION_STREAM = (b": keep-alive\n\n" + _completion_chunk("a") + _completion_chunk("") + _completion_chunk("b")
                     + _completion_chunk(usage={"prompt_tokens": 7, "completion_tokens": 3}, choices=False)
                     + b"data: [DONE]\n\n")


def test_scan_counts_token_chunks_reads_usage_split_anywhere():
    for cut in (1, 5, 37, len(COMPLETION_STREAM)):  # however the network splits it
        rec = RequestResult(3)
        scan = SseScan(rec, chat=False)
        for i in range(0, len(COMPLETION_STREAM), cut):
            scan.feed(COMPLETION_STREAM[i:i + cut], float(i))
        assert len(rec.chunk_times) == 3 and scan.got_usage and scan.done
        assert (rec.prompt_tokens, rec.output_tokens) == (7, 3)


def test_scan_chat_skips_role_and_finish_chunks_and_reads_crlf():
    def chunk(delta, finish=None, usage=None):
        body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else [],
                "usage": usage}
        return b"data: " + json.dumps(body).encode() + b"\r\n\r\n"  # spaces after colons, CRLF

    stream = (chunk({"role": "assistant", "content": ""}) + chunk({"content": "Hi"})
              + chunk({"reasoning_content": "hm"}) + chunk({}, "length")
              + chunk(None, usage={"prompt_tokens": 4, "completion_tokens": 2}) + b"data: [DONE]\r\n\r\n")
    for cut in (1, 3, len(stream)):
        rec = RequestResult(2)
        scan = SseScan(rec, chat=True)
        for i in range(0, len(stream), cut):
            scan.feed(stream[i:i + cut], 1.0)
        assert len(rec.chunk_times) == 2 and rec.output_tokens == 2 and scan.done


def test_scan_records_an_error_event():
    rec = RequestResult(3)
    SseScan(rec, chat=False).feed(b'data: {"error":{"message":"engine_dead","type":"server_error"}}\n\n', 0.0)
    assert "engine_dead" in rec.error


def test_request_body_is_streamed_exact_length():
    body = json.loads(request_body("m", [1, 2, 3], 9, chat=False))
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 9 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert json.loads(request_body("m", "hi", 2, chat=True))["messages"] == [{"role": "user", "content": "hi"}]


class _Transport:
    def write(self, data):
        pass

    def close(self):
        pass


def _read_response(raw: bytes, cut: int):
    """raw fed to a connection `cut` bytes at a time: (status, what reached the sink, reusable)."""
    loop = asyncio.new_event_loop()
    try:
        conn, got, fut = _Conn(), [], loop.create_future()
        conn.connection_made(_Transport())
        conn.begin(b"", lambda data, now: got.append(data), fut)
        for i in range(0, len(raw), cut):
            conn.data_received(raw[i:i + cut])
        assert fut.done(), raw[:60]
        return fut.result(), b"".join(got), conn.reusable(), bytes(conn.error_body)
    finally:
        loop.close()


def test_chunked_responses_decode_whatever_the_reads():
    events = [COMPLETION_STREAM[i:i + 40] for i in range(0, len(COMPLETION_STREAM), 40)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    for cut in (1, 2, 7, 64, len(head + body)):
        assert _read_response(head + body, cut)[:3] == (200, COMPLETION_STREAM, True)
    # a chunk extension and a trailer; a server that closes after the response
    odd = b"5;x=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n"
    assert _read_response(head + odd, 3)[:3] == (200, b"hello", True)
    closing = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + b"2\r\nhi\r\n0\r\n\r\n"
    assert _read_response(closing, 4)[:3] == (200, b"hi", False)


def test_an_error_status_keeps_its_body_not_the_stream():
    raw = b'HTTP/1.1 429 Too Many Requests\r\ncontent-length: 20\r\n\r\n{"error":"too many"}'
    status, streamed, reusable, error = _read_response(raw, 5)
    assert (status, streamed, reusable, error) == (429, b"", True, b'{"error":"too many"}')


def test_sse_scan_cost_per_chunk_is_small():
    """The scanner's share of the client's cost: a few microseconds a token event."""
    chunk = _completion_chunk("hello")
    rec = RequestResult(10**6)
    scan = SseScan(rec, chat=False)
    t = time.process_time()
    for _ in range(20000):
        scan.feed(chunk, 0.0)
    per = (time.process_time() - t) / 20000
    assert len(rec.chunk_times) == 20000 and per < 20e-6, per


# -- against a real server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_up(tmp_path_factory):
    """`localserve up random:tiny-llama` on one CPU thread (a small KV share: it starts faster)."""
    srv = start_server([MODEL, "--backend", "cpu", "--threads", "1", "--kv-memory", "0.005"],
                       tmp_path_factory.mktemp("bench_up") / "up.log")
    yield srv
    srv.stop()


def _job(url, n, out, arrivals=None, prompt_len=8, **kw):
    bodies = [request_body(MODEL, p, out, chat=False) for p in token_prompts([prompt_len] * n, 512, seed=n)]
    return ClientJob(url, "/v1/completions", False, bodies, [out] * n, arrivals or [0.0] * n, **kw)


def _bench(url, tmp_path, *args) -> tuple[int, dict]:
    out = tmp_path / "serving.json"
    code = main(["bench", "--serving", "--url", url, *args, "--json", str(out)])
    return code, json.loads(out.read_text())


def test_serving_bench_all_at_once(tiny_up, tmp_path, capsys):
    code, d = _bench(tiny_up.url, tmp_path, "--num-prompts", "24", "--input-len", "24:40", "--output-len", "8:24",
                     "--warmup", "2")
    table = capsys.readouterr().out
    assert code == 0, table
    assert "Serving Benchmark Result" in table and "Median TTFT (ms):" in table and "P99 ITL (ms):" in table
    h, asked = d["http"], d["requests"]
    assert h["completed"] == 24 and h["failed"] == 0
    # every request got exactly the max_tokens it asked for, and the totals are those sums
    assert h["total_output_tokens"] == h["expected_output_tokens"] == sum(asked["output_tokens"])
    assert all(8 <= n <= 24 for n in asked["output_tokens"]) and len(set(asked["output_tokens"])) > 1
    assert d["workload"]["prompt_format"] == "ids"  # the tiny model has no tokenizer
    assert h["total_input_tokens"] == sum(asked["prompt_tokens"]) and all(24 <= n <= 40 for n in asked["prompt_tokens"])
    assert h["median_ttft_ms"] > 0 and h["mean_tpot_ms"] > 0 and h["p99_itl_ms"] > 0
    assert h["peak_concurrency"] == 24 and h["client_procs"] == 1
    assert h["client_cpu_s"] > 0 and h["client_cpu_us_per_output_token"] > 0
    assert d["server"]["model"] == MODEL and d["server"]["status"]["backend"] == "cpu"
    assert d["server"]["during_run"]["preemptions"] == 0
    assert d["config"]["request_rate"] == "inf" and d["command"].startswith("localserve bench --serving")


def test_serving_bench_poisson_arrivals_under_a_concurrency_limit_in_two_processes(tiny_up, tmp_path, capsys):
    code, d = _bench(tiny_up.url, tmp_path, "--num-prompts", "20", "--input-len", "16", "--output-len", "6",
                     "--request-rate", "40", "--max-concurrency", "3", "--client-procs", "2", "--warmup", "0")
    assert code == 0, capsys.readouterr().out
    h = d["http"]
    assert h["completed"] == 20 and h["failed"] == 0 and h["total_output_tokens"] == 120
    assert h["total_input_tokens"] == 20 * 16 and h["client_procs"] == 2
    assert h["peak_concurrency"] <= 3
    assert h["duration_s"] > 0.3  # 20 Poisson arrivals at 40/s span ~0.5 s
    assert d["config"]["request_rate"] == 40.0 and "--request-rate 40" in d["command"]


def test_a_second_run_of_the_same_prompts_is_flagged_as_prefix_cached(tiny_up, tmp_path, capsys):
    args = ("--num-prompts", "4", "--input-len", "64", "--output-len", "2", "--warmup", "0", "--seed", "5")
    first, second = _bench(tiny_up.url, tmp_path, *args), _bench(tiny_up.url, tmp_path, *args)
    assert first[0] == second[0] == 0
    assert first[1]["server"]["during_run"]["prefix_hit_tokens"] == 0
    assert second[1]["server"]["during_run"]["prefix_hit_tokens"] >= 4 * 48  # whole pages of each prompt
    out = capsys.readouterr().out
    assert out.count("hit the server's prefix cache") == 1


def test_prefix_repetition_prompts_share_their_groups_prefix():
    from localserve.bench.serving_data import shared_prefixes

    questions = token_prompts([8] * 12, 500, 3)
    prompts, order = shared_prefixes(questions, 3, 32, "ids", 500, 3)
    assert sorted(order) == list(range(12)) and order != list(range(12))  # shuffled
    for p, i in zip(prompts, order):
        assert len(p) == 40 and p[32:] == questions[i]
    groups = {tuple(p[:32]) for p in prompts}
    assert len(groups) == 3 and all(sum(tuple(p[:32]) == g for p in prompts) == 4 for g in groups)


def test_prefix_repetition_reports_the_servers_hit_rate(tiny_up, tmp_path, capsys):
    """4 prefixes of 64 tokens, 16 prompts: 12 of them can reuse their prefix's 4 pages."""
    code, d = _bench(tiny_up.url, tmp_path, "--dataset", "prefix-repetition", "--num-prompts", "16",
                     "--num-prefixes", "4", "--prefix-len", "64", "--input-len", "8", "--output-len", "2",
                     "--warmup", "0", "--seed", "11", "--max-concurrency", "4")
    assert code == 0
    assert d["http"]["total_input_tokens"] == 16 * 72
    during = d["server"]["during_run"]
    assert during["prefix_query_tokens"] >= 16 * 64
    assert during["prefix_hit_tokens"] >= 12 * 64 * 0.75, during  # whole pages, some prompts in flight together
    assert "prefix cache:" in capsys.readouterr().out and "--num-prefixes 4" in d["command"]


def test_processes_send_on_the_schedule_and_merge_in_order(tiny_up):
    arrivals = poisson_arrivals(12, 60.0, 0)
    job = _job(tiny_up.url, 12, 3, arrivals)
    job.bodies = [request_body(MODEL, [20 + i] * (4 + i), 3, chat=False) for i in range(12)]  # lengths tell them apart
    run = run_client(job, procs=3)
    assert [r.prompt_tokens for r in run.results] == [4 + i for i in range(12)] and len(run.proc_cpu_s) == 3
    assert run.total_cpu_s > run.cpu_s > 0  # the processes' start-up counts in the total, not in the timed part
    t0 = min(r.start for r in run.results)
    # request i was sent no earlier than its arrival time (one clock across the processes)
    assert all(r.start - t0 >= a - 0.01 for r, a in zip(run.results, arrivals))


def test_hundreds_of_concurrent_streams_one_client_process(tiny_up):
    run = run_client(_job(tiny_up.url, 300, 3, prompt_len=4))
    m = summarize(run.results)
    assert m["failed"] == 0, m["errors"]
    assert m["total_output_tokens"] == 900 and m["peak_concurrency"] >= 250


def test_the_builtin_client_reads_what_httpx_reads_for_far_less_cpu(tiny_up):
    runs = {c: run_client(_job(tiny_up.url, 32, 48, http_client=c)) for c in ("httpx", "builtin")}
    per_token = {}
    for c, run in runs.items():
        m = summarize(run.results)
        assert m["failed"] == 0 and m["total_output_tokens"] == 32 * 48, (c, m["errors"])
        assert all(len(r.chunk_times) >= 24 for r in run.results)  # token events, a few coalesced
        per_token[c] = run.cpu_s / m["total_output_tokens"]
    assert [r.prompt_tokens for r in runs["httpx"].results] == [r.prompt_tokens for r in runs["builtin"].results]
    assert per_token["builtin"] < per_token["httpx"] / 2, per_token


def test_serving_bench_chat_needs_a_tokenizer(tiny_up, capsys):
    # the tiny model has no chat template: every request fails, and the run says why
    code = main(["bench", "--serving", "--url", tiny_up.url, "--endpoint", "chat", "--num-prompts", "2",
                 "--input-len", "8", "--output-len", "4", "--warmup", "0"])
    out = capsys.readouterr().out
    assert code == 1 and "Failed requests:                                         2" in out and "no tokenizer" in out


def test_an_unreachable_server_is_failed_requests_not_a_crash(capsys):
    run = run_client(_job(f"http://127.0.0.1:{free_port()}", 3, 2))
    m = summarize(run.results)
    assert m["failed"] == 3 and "ConnectionRefusedError" in m["errors"][0]["error"]
    code = main(["bench", "--serving", "--url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "1"])
    assert code == 1 and "cannot reach the server" in capsys.readouterr().err


def test_in_process_figures_beside_the_http_ones(tiny_up, tmp_path, capsys):
    """The same token ids into an in-process engine: the same token counts, and the ratio."""
    code, d = _bench(tiny_up.url, tmp_path, "--in-process", "--num-prompts", "8", "--input-len", "16:32", "--output-len",
                     "4:12", "--warmup", "1")
    table = capsys.readouterr().out
    assert code == 0, table
    assert "in-process" in table and "HTTP / in-process: output_throughput" in table
    h, p = d["http"], d["in_process"]
    assert p["completed"] == 8 and p["failed"] == 0
    assert p["total_input_tokens"] == h["total_input_tokens"] and p["total_output_tokens"] == h["total_output_tokens"]
    assert p["engine"]["source"] == MODEL and p["engine"]["backend"] == "cpu"
    assert p["http_over_in_process"]["output_throughput"] > 0
