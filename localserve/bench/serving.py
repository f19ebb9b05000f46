"""`localserve bench --serving`: a load generator for a running `localserve up`, in the manner of
vLLM's `benchmarks/benchmark_serving.py` (`vllm bench serve`), so every performance figure can be
measured through the product.

It asks the server for its model (GET /v1/models, /api/status), builds a fixed-seed workload
(serving_data), sends it as streamed `/v1/completions` or `/v1/chat/completions` requests with
`ignore_eos` and a fixed `max_tokens` each, on a schedule (all at once, or Poisson arrivals),
optionally under a concurrency limit (serving_client), and reports vLLM's figures
(serving_metrics) plus the client's own CPU cost (serving_report). `--in-process` drives the
same workload, the same token ids, into an LLMEngine in this process as well
(serving_inprocess) and prints the two side by side with their ratio.
The HTTP side imports no torch: it runs wherever Python, httpx and numpy do.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from localserve.bench.cpu_load import LOCAL_HOSTS, CpuLoad
from localserve.bench.serving_client import ClientJob, run_client
from localserve.bench.serving_config import ENDPOINTS, ServingBenchConfig, command_line, cpu_count, parse_length
from localserve.bench.serving_data import (
    Workload, calibration_text, poisson_arrivals, sample_lengths, shared_prefixes, text_prompts, token_prompts)
from localserve.bench.serving_metrics import client_figures, summarize
from localserve.bench.serving_report import format_table, ratios
from localserve.bench.serving_sse import request_body
from localserve.bench.stream_overhead import ServerProcess  # noqa: F401 (its home before the rename)

WARMUP_OUTPUT = 16  # warm-up requests are short: they warm the server, not measure it
READY_TIMEOUT_S = 900.0  # how long to wait for a server whose model is still loading


@dataclass(slots=True)
class ServingBenchResult:
    config: dict
    command: str
    date: str
    machine: dict
    server: dict  # url, endpoint, model name, /api/status model info, what changed on the server during the run
    workload: dict  # prompt format, lengths asked and got
    http: dict  # the figures (serving_metrics.summarize + client_figures)
    in_process: dict | None = None
    load: dict = field(default_factory=dict)  # CPU seconds of server and others during the run
    requests: dict = field(default_factory=dict)  # per-request ttft / latency / lengths

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["config"]["request_rate"] == math.inf:
            d["config"]["request_rate"] = "inf"
        return d

    def table(self) -> str:
        return format_table(self)


def _headers(cfg: ServingBenchConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def server_info(cfg: ServingBenchConfig, log=None, ready_timeout: float = READY_TIMEOUT_S) -> dict:
    """The served model's name, vocabulary and context (GET /v1/models) and, from localserve,
    its /api/status model entry; waits while the server answers 503 (its model still loading)."""
    import httpx

    deadline = time.monotonic() + ready_timeout
    with httpx.Client(base_url=cfg.url, headers=_headers(cfg), timeout=30, trust_env=False) as c:
        while (r := c.get("/v1/models")).status_code == 503 and time.monotonic() < deadline:
            if log is not None:
                log(f"waiting for {cfg.url} to load its model (503: {_error_text(r)})")
                log = None
            time.sleep(1.0)
        r.raise_for_status()
        card = r.json()["data"][0]
        status, pid = None, None
        try:
            s = c.get("/api/status")
            if s.status_code == 200:
                pid = s.json().get("pid")
                status = (s.json().get("models") or [None])[0]
        except (httpx.HTTPError, ValueError):
            pass
    meta = card.get("meta") or {}
    return {"url": cfg.url, "model": card["id"], "vocab_size": meta.get("n_vocab"),
            "context": card.get("max_model_len") or card.get("context_length"), "status": status, "pid": pid}


def _error_text(r) -> str:
    try:
        err = r.json().get("error")
        return str(err.get("message", err) if isinstance(err, dict) else err)[:200]
    except (ValueError, AttributeError):
        return r.text[:200]


def _count_tokens(cfg: ServingBenchConfig, model: str, text: str) -> int | None:
    """Tokens of a one-message chat (localserve's /v1/messages/count_tokens); None when the model
    has no tokenizer or chat template, or the server has no such route."""
    import httpx

    try:
        r = httpx.post(cfg.url + "/v1/messages/count_tokens", headers=_headers(cfg), timeout=30, trust_env=False,
                       json={"model": model, "messages": [{"role": "user", "content": text}]})
        return r.json().get("input_tokens") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def prompt_format(cfg: ServingBenchConfig, model: str) -> tuple[str, float]:
    """(ids | text, words per token of the text prompts' words on this model). auto: text when
    the server can count a text's tokens (the model has a tokenizer), else token-id lists, which
    every model takes on /v1/completions."""
    fmt = "text" if cfg.endpoint == "chat" else cfg.prompt_format
    sample = calibration_text()
    full = _count_tokens(cfg, model, sample) if fmt != "ids" else None
    if fmt == "auto":
        fmt = "text" if full is not None else "ids"
    ratio = 1.0
    if fmt == "text" and full is not None:
        empty = _count_tokens(cfg, model, "") or 0
        ratio = len(sample.split()) / max(1, full - empty)
    return fmt, ratio


def build_workload(cfg: ServingBenchConfig, fmt: str, words_per_token: float, vocab: int, n: int, seed: int,
                   output_cap: int | None = None) -> Workload:
    ins, outs = sample_lengths(cfg.dataset, n, parse_length(cfg.input_len), parse_length(cfg.output_len), seed)
    if output_cap is not None:
        outs = [min(o, output_cap) for o in outs]
    prompts = token_prompts(ins, vocab, seed) if fmt == "ids" else text_prompts(ins, seed, words_per_token)
    if cfg.dataset == "prefix-repetition":
        prompts, order = shared_prefixes(prompts, min(cfg.num_prefixes, n), cfg.prefix_len, fmt, vocab, seed,
                                         words_per_token)
        ins, outs = [cfg.prefix_len + ins[i] for i in order], [outs[i] for i in order]
    return Workload(prompts, ins, outs, poisson_arrivals(n, cfg.request_rate, seed))


def run_serving_bench(cfg: ServingBenchConfig, log=print) -> ServingBenchResult:
    from localserve.bench.machine import machine_info

    info = server_info(cfg, log)
    model = info["model"]
    fmt, wpt = prompt_format(cfg, model)
    vocab = cfg.vocab_size or info["vocab_size"] or 32000
    work = build_workload(cfg, fmt, wpt, vocab, cfg.num_prompts, cfg.seed)
    warm = build_workload(cfg, fmt, wpt, vocab, cfg.warmup, cfg.seed + 7919, output_cap=WARMUP_OUTPUT)
    chat, procs = cfg.endpoint == "chat", cfg.procs()
    job = ClientJob(cfg.url, ENDPOINTS[cfg.endpoint], chat,
                    [request_body(model, p, o, chat) for p, o in zip(work.prompts, work.output_lens)],
                    list(work.output_lens), list(work.arrivals), cfg.max_concurrency, cfg.http_client, _headers(cfg),
                    [(request_body(model, p, o, chat), o) for p, o in zip(warm.prompts, warm.output_lens)])
    log(f"{cfg.num_prompts} requests ({cfg.dataset}, {fmt} prompts, rate {cfg.request_rate:g}/s, "
        f"max concurrency {cfg.max_concurrency or 'none'}) to {cfg.url}{ENDPOINTS[cfg.endpoint]} ({model}), "
        f"{cfg.http_client} HTTP client, {procs} client process(es), {cfg.warmup} warm-up request(s)")
    before = info["status"]
    load = CpuLoad((info.get("pid"), (before or {}).get("engine_pid")), cfg.url, cpu_count())
    run = run_client(job, procs)
    load_figures = load.finish(run.total_cpu_s)
    http = summarize(run.results)
    dur = http.get("duration_s")
    http |= client_figures(run.cpu_s, dur, len(run.results), http.get("total_output_tokens", 0), len(run.proc_cpu_s),
                           max(run.proc_cpu_s) / dur if dur else 0.0)
    if run.warmup_errors:
        http["warmup_errors"] = run.warmup_errors[:3]
    after = server_info(cfg)["status"]
    ok = [r for r in run.results if r.ok]
    result = ServingBenchResult(
        config=asdict(cfg) | {"client_procs": len(run.proc_cpu_s), "api_key": "set" if cfg.api_key else None},
        command=command_line(cfg),
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        machine=machine_info(),
        server={"url": cfg.url, "endpoint": ENDPOINTS[cfg.endpoint], "model": model, "status": before,
                "during_run": _server_delta(before, after)},
        workload={"prompt_format": fmt, "words_per_token": round(wpt, 4), "vocab_size": vocab if fmt == "ids" else None,
                  "input_len_target_mean": _mean(work.input_lens), "output_len_mean": _mean(work.output_lens),
                  "input_len_served_mean": _mean([r.prompt_tokens for r in ok])},
        http=http, load=load_figures,
        requests={"ttft_s": [round(r.ttft, 6) if r.ok else None for r in run.results],
                  "latency_s": [round(r.latency, 6) if r.ok else None for r in run.results],
                  "prompt_tokens": [r.prompt_tokens for r in run.results],
                  "output_tokens": [r.output_tokens for r in run.results]},
    )
    if cfg.in_process:
        result.in_process = _in_process(cfg, work, warm, before, log)
        result.in_process["http_over_in_process"] = ratios(http, result.in_process)
    return result


def _in_process(cfg: ServingBenchConfig, work: Workload, warm: Workload, status: dict | None, log) -> dict:
    """The same workload into an LLMEngine here: the server's model, backend and batch shape
    unless --model / --backend say otherwise."""
    from localserve.bench.serving_inprocess import run_in_process

    status = status or {}
    ref = cfg.model or status.get("source")
    backend = status.get("backend") if cfg.backend == "auto" and status.get("backend") else cfg.backend
    seqs = (status.get("limits") or {}).get("max_running") or 64
    threads = cfg.threads or _server_threads(status.get("engine_pid"), cfg.url)
    results, cpu, described = run_in_process(work, warm, model=ref, backend=backend, threads=threads,
                                             max_num_seqs=seqs, max_concurrency=cfg.max_concurrency, log=log)
    return summarize(results) | {"process_cpu_s": cpu, "engine": described}


def _server_threads(pid: int | None, url: str) -> int | None:
    """The --threads a server on this machine was started with (from its command line), so that
    the in-process engine gets the same; None when it is elsewhere or was not given any."""
    if not pid or (urlparse(url).hostname or "") not in LOCAL_HOSTS:
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, a in enumerate(argv):
        v = argv[i + 1] if a == "--threads" and i + 1 < len(argv) else a[10:] if a.startswith("--threads=") else None
        if v is not None and v.isdigit():
            return int(v)
    return None


def _server_delta(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None
    pc0, pc1 = before.get("prefix_cache") or {}, after.get("prefix_cache") or {}
    return {"preemptions": after.get("preemptions", 0) - before.get("preemptions", 0),
            "prefix_hit_tokens": pc1.get("hit_tokens", 0) - pc0.get("hit_tokens", 0),
            "prefix_query_tokens": pc1.get("query_tokens", 0) - pc0.get("query_tokens", 0)}


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None
