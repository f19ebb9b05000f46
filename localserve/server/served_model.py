"""One model behind the API: its AsyncEngine, admission limits and the metrics of its requests.

Admission: at most `max_running` sequences run in the engine at once (its max_num_seqs) and at
most `max_queued` more wait; past that a request is refused with 429 and Retry-After instead of
piling up behind the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

from localserve.engine.llm_engine import check_prompt, eos_token_ids
from localserve.engine.outputs import SeqDelta
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import EngineOverloadedError, ModelNotFoundError
from localserve.server import request_log
from localserve.server.events import RequestTrace
from localserve.server.metrics import ServerMetrics


@dataclass(slots=True)
class Limits:
    max_running: int
    max_queued: int
    max_tokens_default: int = 4096  # a request that names no limit; 0: the context is the limit


class ServedModel:
    def __init__(self, loaded, names: Sequence[str], limits: Limits, metrics: ServerMetrics) -> None:
        """loaded: the engine and what it serves — a runtime InProcessEngine (the engine on a
        thread of this process) or EngineCoreClient (in a process of its own); names: the
        model ids clients may ask for."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = eos_token_ids(loaded.config, loaded.tokenizer)
        self.names = list(names)
        self.limits = limits
        self.metrics = metrics
        self.created = int(time.time())
        self.num_in_flight = 0  # sequences admitted and not yet finished
        # (event type, data) hooks for request_start / request_finish (the server's EventBus)
        self.listeners: list[Callable[[str, dict], None]] = []
        self._register_gauges()

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def max_context(self) -> int:
        return self.loaded.info.max_context

    def check_model(self, requested: str) -> None:
        # an empty model field means "the one this server serves", as Ollama-style clients expect
        if requested and requested not in self.names:
            raise ModelNotFoundError(requested, self.names)

    def apply_default_max_tokens(self, params: SamplingParams, num_prompt_tokens: int) -> None:
        """A request that names no max_tokens gets the server's default, within the room the
        prompt leaves: a model that loops then stops (finish_reason length) instead of
        filling the context."""
        default = self.limits.max_tokens_default
        room = self.max_context - num_prompt_tokens
        if params.max_tokens is None and default > 0 and room >= 1:
            params.max_tokens = min(default, room)

    def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               arrival: float | None = None) -> list[AsyncIterator[SeqDelta]]:
        """Checks admission and every prompt now (so an error is an HTTP status, not a broken
        stream), then returns per prompt the deltas of its choices until all are finished.
        Leaving an iterator early (a client that disconnects) aborts its request and frees its
        pages."""
        arrival = arrival if arrival is not None else time.monotonic()
        capacity = self.limits.max_running + self.limits.max_queued
        wanted = params.n * len(prompts)
        if self.num_in_flight + wanted > capacity:
            self._count("overloaded")
            raise EngineOverloadedError(
                f"the server is at capacity ({self.num_in_flight} sequences running or queued, "
                f"limit {capacity}); retry shortly", retry_after=1)
        try:
            for prompt in prompts:
                check_prompt(len(prompt), params, self.max_context)
        except Exception:
            self._count("rejected")
            raise
        return [self._stream(prompt, params, arrival) for prompt in prompts]

    async def _stream(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                      arrival: float) -> AsyncIterator[SeqDelta]:
        self.num_in_flight += params.n
        remaining = params.n
        last_token_time: dict[int, float] = {}
        status = "aborted"
        trace = RequestTrace(uuid.uuid4().hex, self.name, len(prompt_token_ids), params.n, params.max_tokens, arrival)
        record = request_log.current()
        if record is not None:
            record.model = self.name
            record.prompt_tokens += len(prompt_token_ids)
        cached = 0
        self._emit("request_start", trace.start)
        try:
            async for delta in self.loaded.generate(prompt_token_ids, params, trace.id):
                self._record_tokens(delta, arrival, last_token_time)
                trace.observe(len(delta.token_ids), delta.num_cached_tokens, delta.index, delta.finish_reason)
                cached = max(cached, delta.num_cached_tokens)
                if record is not None and delta.token_ids:
                    record.generated_tokens += len(delta.token_ids)
                    if record.first_token is None:
                        record.first_token = time.monotonic()
                if delta.finished:
                    remaining -= 1
                    self.num_in_flight -= 1
                yield delta
            status = "finished"
        except (GeneratorExit, asyncio.CancelledError):
            raise  # the client left: counted as aborted
        except BaseException:
            status = "error"
            raise
        finally:
            if record is not None:
                record.cached_tokens += cached
            self.num_in_flight -= remaining
            self._count(status)
            with self.metrics.lock:
                self.metrics.prompt_tokens.inc(len(prompt_token_ids))
                self.metrics.e2e.observe(time.monotonic() - arrival)
            self._emit("request_finish", lambda: trace.finish(status))

    def _emit(self, type: str, data: Callable[[], dict]) -> None:
        # a monitor must never break serving: its errors stay its own
        for listener in self.listeners:
            try:
                listener(type, data())
            except Exception:
                logging.getLogger(__name__).exception("event listener failed")

    def _record_tokens(self, delta: SeqDelta, arrival: float, last: dict[int, float]) -> None:
        n = len(delta.token_ids)
        if not n:
            return
        now = time.monotonic()
        m = self.metrics
        with m.lock:
            m.generation_tokens.inc(n)
            prev = last.get(delta.index)
            if prev is None:
                m.ttft.observe(now - arrival)
            else:
                # several tokens in one delta (jump-forward) share the gap
                for _ in range(n):
                    m.itl.observe((now - prev) / n)
        last[delta.index] = now

    def _count(self, status: str) -> None:
        with self.metrics.lock:
            self.metrics.requests.inc(1, status)

    def _register_gauges(self) -> None:
        m, eng = self.metrics, self.loaded
        m.add_gauge("localserve_sequences_admitted", "Sequences admitted by the server and not finished "
                    "(running, waiting or being streamed).", lambda: self.num_in_flight)
        m.add_gauge("localserve_requests_running", "Sequences running in the engine.",
                    lambda: eng.stats().num_running)
        m.add_gauge("localserve_requests_waiting", "Sequences waiting for the engine.",
                    lambda: eng.stats().num_waiting)
        m.add_gauge("localserve_kv_pages_used", "KV pages held by running sequences.",
                    lambda: eng.stats().kv_pages_used)
        m.add_gauge("localserve_kv_pages_cached", "KV pages held only by the prefix cache (evictable).",
                    lambda: eng.stats().kv_pages_cached)
        m.add_gauge("localserve_kv_pages_total", "KV pages in the pool.", lambda: eng.stats().kv_pages_total)
        m.add_gauge("localserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                    lambda: eng.stats().prefix_hit_tokens, kind="counter")
        m.add_gauge("localserve_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.",
                    lambda: eng.stats().prefix_query_tokens, kind="counter")
        m.add_gauge("localserve_prefix_cache_hit_ratio", "Prefix-cache hit tokens / query tokens.",
                    lambda: _ratio(eng.stats()))
        m.add_gauge("localserve_preemptions", "Sequences preempted (recomputed) since start.",
                    lambda: eng.stats().num_preemptions, kind="counter")

    def shutdown(self) -> None:
        self.loaded.shutdown()


def _ratio(stats) -> float:
    return stats.prefix_hit_tokens / stats.prefix_query_tokens if stats.prefix_query_tokens else 0.0
