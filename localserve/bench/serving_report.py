"""The serving benchmark's table, laid out as vLLM's `benchmark_serving.py` prints it, with an
in-process column beside the HTTP one when there is one, the HTTP / in-process ratios, and notes
when something besides the server shaped the figures: a busy client, other processes, prompts the
server had cached from an earlier run, preemptions."""

from __future__ import annotations

import json
import math
from pathlib import Path

_ROWS = [
    ("Successful requests", "completed", "d"),
    ("Failed requests", "failed", "d"),
    ("Benchmark duration (s)", "duration_s", ".2f"),
    ("Total input tokens", "total_input_tokens", "d"),
    ("Total generated tokens", "total_output_tokens", "d"),
    ("Request throughput (req/s)", "request_throughput", ".2f"),
    ("Output token throughput (tok/s)", "output_throughput", ".2f"),
    ("Total token throughput (tok/s)", "total_token_throughput", ".2f"),
    ("Mean concurrency", "mean_concurrency", ".1f"),
    ("Peak concurrency", "peak_concurrency", "d"),
    ("-Time to First Token", None, None),
    ("Mean TTFT (ms)", "mean_ttft_ms", ".2f"),
    ("Median TTFT (ms)", "median_ttft_ms", ".2f"),
    ("P99 TTFT (ms)", "p99_ttft_ms", ".2f"),
    ("-Time per Output Token (excl. 1st token)", None, None),
    ("Mean TPOT (ms)", "mean_tpot_ms", ".2f"),
    ("Median TPOT (ms)", "median_tpot_ms", ".2f"),
    ("P99 TPOT (ms)", "p99_tpot_ms", ".2f"),
    ("-Inter-token Latency", None, None),
    ("Mean ITL (ms)", "mean_itl_ms", ".2f"),
    ("Median ITL (ms)", "median_itl_ms", ".2f"),
    ("P99 ITL (ms)", "p99_itl_ms", ".2f"),
    ("-End-to-end Latency", None, None),
    ("Mean E2EL (ms)", "mean_e2el_ms", ".2f"),
    ("Median E2EL (ms)", "median_e2el_ms", ".2f"),
    ("P99 E2EL (ms)", "p99_e2el_ms", ".2f"),
    ("-Client (this benchmark's own cost)", None, None),
    ("Client processes", "client_procs", "d"),
    ("Client CPU time (s)", "client_cpu_s", ".2f"),
    ("Client CPU per request (us)", "client_cpu_us_per_request", ".0f"),
    ("Client CPU per output token (us)", "client_cpu_us_per_output_token", ".1f"),
    ("Busiest client process, share of a core", "client_busiest_proc_core_share", ".2f"),
]
# HTTP / in-process, the figures whose ratio says what the server costs
RATIOS = ("output_throughput", "median_ttft_ms", "median_tpot_ms")
WIDTH = 44


def ratios(http: dict, in_process: dict) -> dict:
    out = {}
    for key in RATIOS:
        a, b = http.get(key), in_process.get(key)
        out[key] = a / b if a is not None and b else None
    return out


def _cell(d: dict | None, key: str, fmt: str) -> str:
    if d is None:
        return ""
    v = d.get(key)
    if v is None:
        return "-"
    return format(v, fmt) if fmt != "d" else str(int(v))


def format_table(res) -> str:
    """res: a serving.ServingBenchResult."""
    cfg = res.config
    two = res.in_process is not None
    head = "=" * 22 + " Serving Benchmark Result " + "=" * 22
    lines = [head]
    if two:
        lines.append(f"{'':<{WIDTH}}{'HTTP':>14}{'in-process':>14}")
    rate = cfg["request_rate"]
    lines += [f"{'Model':<{WIDTH}}{res.server['model']}",
              f"{'Endpoint':<{WIDTH}}{res.server['endpoint']} ({res.workload['prompt_format']} prompts)",
              f"{'Traffic request rate':<{WIDTH}}{'inf' if rate in (math.inf, 'inf') else f'{rate:g}'}",
              f"{'Max request concurrency':<{WIDTH}}{cfg['max_concurrency'] or 'not set'}"]
    for label, key, fmt in _ROWS:
        if key is None:
            lines.append(f" {label[1:]} ".center(len(head), "-"))
            continue
        row = f"{label + ':':<{WIDTH}}{_cell(res.http, key, fmt):>14}"
        if two:
            row += f"{_cell(res.in_process, key, fmt):>14}"
        lines.append(row.rstrip())
    lines.append("=" * len(head))
    if two:
        r = res.in_process.get("http_over_in_process") or {}
        shown = [f"{k.replace('_ms', '')} {v:.3f}" for k, v in r.items() if v is not None]
        lines.append("HTTP / in-process: " + (", ".join(shown) or "-"))
    for side, figs in (("HTTP", res.http), ("in-process", res.in_process)):
        for e in (figs or {}).get("errors", []):
            lines.append(f"{side} error ({e['count']}x): {e['error']}")
    share = res.http.get("client_busiest_proc_core_share") or 0
    if share > 0.8:
        lines.append(f"note: a client process was busy {share:.0%} of the run: the client may limit these figures "
                     "(try --client-procs)")
    during = res.server.get("during_run") or {}
    hit, query = during.get("prefix_hit_tokens", 0), during.get("prefix_query_tokens", 0)
    if res.config.get("dataset") == "prefix-repetition":
        n, p = len(res.requests["prompt_tokens"]), min(res.config["num_prefixes"], len(res.requests["prompt_tokens"]))
        total = sum(t or 0 for t in res.requests["prompt_tokens"]) or 1
        ideal = (n - p) * res.config["prefix_len"] / total
        lines.append(f"prefix cache: {hit:,} of {query:,} prompt tokens hit ({hit / max(1, query):.1%}; "
                     f"the shared prefixes allow {ideal:.1%})")
    elif query and hit / query > 0.1:
        lines.append(f"note: {hit / query:.0%} of the prompt tokens hit the server's prefix cache (these prompts ran "
                     "on it before: another --seed, or a fresh server, measures cold prefill)")
    if during.get("preemptions"):
        lines.append(f"note: the server preempted {during['preemptions']} sequence(s) during the run (KV pool full)")
    others = res.load.get("others_core_share")
    if others is not None and others > 0.1:
        lines.append(f"note: other processes used {others:.0%} of the machine's {res.load['cores']} cores during the run")
    return "\n".join(lines)


def write_json(result, path: str) -> None:
    Path(path).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
