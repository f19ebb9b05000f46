"""The serving benchmark's figures, computed as vLLM's `benchmark_serving.py` computes them.

Per request the client records when it sent the request, when each chunk that carried generated
tokens arrived, when the stream ended, and the token counts of the server's `usage`. From those:
* TTFT: first token chunk - send time.
* TPOT (time per output token, the first excluded): (E2E latency - TTFT) / (output tokens - 1),
  per request with at least two output tokens.
* ITL (inter-token latency): every gap between consecutive token chunks, all requests pooled
  (a chunk that carries several tokens is one gap, as in vLLM).
* E2E latency: stream end - send time.
* duration: first send to last stream end; throughputs are tokens (from usage) / duration.
Percentiles interpolate linearly (numpy's default, as vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 99)


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it; times are time.perf_counter() seconds (CLOCK_MONOTONIC on
    Linux: one clock for every client process of the machine)."""

    expected_output: int  # max_tokens asked (ignore_eos: the exact output length)
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # token-carrying chunks, in order
    prompt_tokens: int = 0  # from usage
    output_tokens: int = 0  # from usage
    error: str = ""  # empty: the request succeeded

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start

    def check(self, got_usage: bool) -> None:
        """After the stream ended: a request without usage, without tokens or with another
        output length than asked counts as failed (the workload was not what was measured)."""
        if self.error:
            return
        if not got_usage:
            self.error = "the stream ended without usage (stream_options.include_usage)"
        elif not self.chunk_times:
            self.error = "the stream carried no tokens"
        elif self.output_tokens != self.expected_output:
            self.error = (f"usage.completion_tokens {self.output_tokens} != max_tokens {self.expected_output} "
                          "(ignore_eos not honoured?)")


def _stats(values, prefix: str) -> dict:
    a = np.asarray(values, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {f"mean_{prefix}_ms": None, **{f"{'median' if p == 50 else f'p{p}'}_{prefix}_ms": None for p in PERCENTILES}}
    out = {f"mean_{prefix}_ms": float(a.mean()), f"std_{prefix}_ms": float(a.std())}
    for p in PERCENTILES:
        out[f"{'median' if p == 50 else f'p{p}'}_{prefix}_ms"] = float(np.percentile(a, p))
    return out


def summarize(results: list[RequestResult], *, max_errors: int = 5) -> dict:
    """The run's figures from its requests (the failed ones count only as failures)."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    out = {
        "completed": len(ok),
        "failed": len(failed),
        "errors": [{"error": e, "count": c} for e, c in list(errors.items())[:max_errors]],
    }
    if not ok:
        return out | {"duration_s": None}
    t0 = min(r.start for r in results)
    t1 = max(r.end for r in results)
    duration = max(t1 - t0, 1e-9)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    out |= {
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "expected_output_tokens": sum(r.expected_output for r in results),
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        # requests in flight on average (sum of latencies / duration, as SGLang's "Concurrency")
        "mean_concurrency": sum(r.latency for r in ok) / duration,
        "peak_concurrency": peak_concurrency([(r.start, r.end) for r in results]),
        **_stats([r.ttft for r in ok], "ttft"),
        **_stats(tpots, "tpot"),
        **_stats(itls, "itl"),
        **_stats([r.latency for r in ok], "e2el"),
        "chunks_per_output_token": sum(len(r.chunk_times) for r in ok) / max(total_out, 1),
    }
    return out


def peak_concurrency(spans: list[tuple[float, float]]) -> int:
    """The most requests in flight at one moment."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def client_figures(cpu_s: float, duration_s: float | None, num_requests: int, output_tokens: int,
                   procs: int, max_proc_share: float) -> dict:
    """The client's own cost: CPU seconds of its process(es) over the timed run, per request and
    per output token, and the busiest process's share of one core (near 1: the client may be what
    limits the figures; use --client-procs)."""
    return {
        "client_cpu_s": cpu_s,
        "client_procs": procs,
        "client_cpu_us_per_request": 1e6 * cpu_s / max(num_requests, 1),
        "client_cpu_us_per_output_token": 1e6 * cpu_s / max(output_tokens, 1),
        "client_busiest_proc_core_share": max_proc_share,
        "client_cpu_share_of_duration": cpu_s / duration_s if duration_s else None,
    }
