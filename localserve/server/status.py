"""What the server reports about itself: `GET /api/status` (version, uptime, the loaded model
with its backend, device, memory, context, running/queued requests, KV usage, prefix-cache hit
rate) and the `stats` events a StatsTicker publishes every second.

Engine figures come from `LLMEngine.stats()` (a locked snapshot) and the serving metrics; the
monitor never reaches further into the engine than that.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from litestar import Request, get

from localserve import __version__
from localserve.engine.outputs import EngineStats
from localserve.server.events import STATS_INTERVAL, EventBus

PEEK_SECONDS = 0.1
from localserve.server.state import ServerState, server_state


REQUEST_STATUSES = ("finished", "aborted", "error", "rejected", "overloaded")


@get("/api/status", summary="Server and model status: backend, memory, context, requests, KV, prefix cache",
     tags=["monitor"])
async def status(request: Request) -> dict:
    return server_status(server_state(request))


def server_status(state: ServerState) -> dict:
    served = state.served
    models = [model_status(served)] if served is not None else []
    m = state.metrics
    with m.lock:
        finished = {s: int(m.requests.value(s)) for s in REQUEST_STATUSES}
    return {
        "version": __version__,
        "status": state.status,
        "model_ref": state.model_ref,
        "load_error": state.load_error,
        "uptime_s": round(time.monotonic() - state.started, 3),
        "pid": os.getpid(),
        "process_rss_bytes": _rss_bytes(),
        "models": models,
        "requests": {
            "running": sum(x["running"] for x in models),
            "queued": sum(x["queued"] for x in models),
            "finished": finished,  # by status: finished, aborted, error, rejected, overloaded
        },
    }


def model_status(served) -> dict:
    """served: a ServedModel."""
    loaded, info = served.loaded, served.loaded.info
    st = loaded.stats()
    cfg = loaded.config
    kv = kv_figures(st, info.block_size)
    return {
        "name": served.name,
        "names": list(served.names),
        "source": loaded.source,
        "architecture": cfg.architecture,
        "backend": loaded.backend_name,
        "device": info.device,
        "engine_pid": loaded.pid,  # the server's own pid when the engine runs on its thread
        "load_seconds": round(loaded.load_seconds, 3),
        "context": info.max_context,
        "model_context": cfg.max_context,
        "memory": {
            "weights_bytes": estimated_weight_bytes(cfg, loaded.backend_name),
            "weights_file_bytes": _path_bytes(loaded.source),
            "kv_bytes": kv["capacity_tokens"] * info.kv_bytes_per_token,
            "kv_bytes_per_token": info.kv_bytes_per_token,
        },
        "limits": {"max_running": served.limits.max_running, "max_queued": served.limits.max_queued},
        "running": st.num_running,
        "queued": st.num_waiting,
        "in_flight": served.num_in_flight,
        "kv": kv,
        "prefix_cache": {
            "hit_tokens": st.prefix_hit_tokens,
            "query_tokens": st.prefix_query_tokens,
            "hit_rate": _ratio(st.prefix_hit_tokens, st.prefix_query_tokens),
        },
        "preemptions": st.num_preemptions,
        "tokens": {
            "prompt": int(served.metrics.prompt_tokens.value()),
            "generated": int(served.metrics.generation_tokens.value()),
        },
        # speculative decoding reports its acceptance here once the engine has it
        "spec_acceptance": _spec_acceptance(st),
    }


def kv_figures(st: EngineStats, page_size: int) -> dict:
    return {
        "pages_used": st.kv_pages_used,
        "pages_cached": st.kv_pages_cached,
        "pages_total": st.kv_pages_total,
        "page_size": page_size,
        "usage": _ratio(st.kv_pages_used, st.kv_pages_total),
        "capacity_tokens": st.kv_pages_total * page_size,
    }


def estimated_weight_bytes(cfg, backend: str) -> int:
    """Weights in device memory, from the shapes: the CPU backend keeps matrices as Q8_0
    (34 bytes per 32 weights), accelerators in 16 bits; norms stay float32 (negligible)."""
    q, kv, h = cfg.q_size, cfg.kv_size, cfg.hidden_size
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    matrices = cfg.num_layers * per_layer + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return matrices * 34 // 32 if backend == "cpu" else matrices * 2


def _spec_acceptance(st: EngineStats) -> float | None:
    accepted, drafted = getattr(st, "spec_accepted_tokens", None), getattr(st, "spec_draft_tokens", None)
    return _ratio(accepted, drafted) if accepted is not None and drafted else None


def _path_bytes(source: str) -> int | None:
    p = Path(source)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _ratio(a: float, b: float) -> float:
    return round(a / b, 6) if b else 0.0


@dataclass
class StatsTicker:
    """Publishes a `stats` event every interval while a model is served. Rates (tok/s, the
    recent prefix hit rate) are differences since the previous event; the queue and KV peaks
    come from samples every PEEK_SECONDS in between, so short bursts still show."""

    state: ServerState
    bus: EventBus
    interval: float = STATS_INTERVAL
    _last: tuple | None = field(default=None, init=False)  # (time, generated, hit, query)
    _queue_peak: int = field(default=0, init=False)
    _kv_peak: int = field(default=0, init=False)

    async def run(self) -> None:
        peeks = max(1, round(self.interval / PEEK_SECONDS))
        while True:
            for _ in range(peeks):
                await asyncio.sleep(self.interval / peeks)
                self.peek()
            if self.state.served is not None:
                self.bus.publish("stats", **self.sample())

    def peek(self) -> None:
        if self.state.served is not None:
            st = self.state.served.loaded.stats()
            self._queue_peak = max(self._queue_peak, st.num_running + st.num_waiting)
            self._kv_peak = max(self._kv_peak, st.kv_pages_used)

    def sample(self) -> dict:
        served = self.state.served
        st = served.loaded.stats()
        now = time.monotonic()
        generated = served.metrics.generation_tokens.value()
        last = self._last or (now - self.interval, generated, st.prefix_hit_tokens, st.prefix_query_tokens)
        self._last = (now, generated, st.prefix_hit_tokens, st.prefix_query_tokens)
        dt = max(now - last[0], 1e-6)
        queue_peak = max(self._queue_peak, st.num_running + st.num_waiting)
        kv_peak = max(self._kv_peak, st.kv_pages_used)
        self._queue_peak = self._kv_peak = 0
        return {
            "model": served.name,
            "running": st.num_running,
            "waiting": st.num_waiting,
            "in_flight": served.num_in_flight,
            "queue_peak": queue_peak,  # the most running + waiting seen since the last event
            "kv": kv_figures(st, served.loaded.info.block_size),
            "kv_usage_peak": _ratio(kv_peak, st.kv_pages_total),
            "prefix_hit_rate": _ratio(st.prefix_hit_tokens, st.prefix_query_tokens),
            "prefix_hit_rate_recent": _ratio(st.prefix_hit_tokens - last[2], st.prefix_query_tokens - last[3]),
            "prefix_query_tokens_recent": st.prefix_query_tokens - last[3],
            "tok_s": round((generated - last[1]) / dt, 3),
            "generated_tokens": int(generated),
            "preemptions": st.num_preemptions,
            "spec_acceptance": _spec_acceptance(st),
        }
