"""localserve's in-process engine as a bench runner: add requests, step until done."""

from __future__ import annotations

import time

from localserve.bench.timing import BatchTiming, StreamTiming
from localserve.engine.sampling_params import SamplingParams


# A stream that goes this many steps without a token is stuck (an engine bug: the engine caps the
# context at the KV pool, so every request it accepts can finish); chunked prefill needs far fewer.
MAX_IDLE_STEPS = 10_000


def greedy(max_tokens: int) -> SamplingParams:
    # ignore_eos: every engine does the same number of steps whatever the model says
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, seed=0)


class EngineRunner:
    name = "localserve"
    batch_mode = "continuous batching"

    def __init__(self, loaded) -> None:
        """loaded: a runtime.loader.LoadedModel; its engine must be idle and used only by this runner."""
        self.loaded = loaded
        self.engine = loaded.engine

    def stream(self, prompt: list[int], max_tokens: int) -> StreamTiming:
        engine = self.engine
        assert not engine.has_unfinished(), "the bench owns the engine: nothing else may run on it"
        start = time.perf_counter()
        rid = engine.add_request(prompt, greedy(max_tokens))
        times: list[float] = []
        cached = None
        idle = 0
        while engine.has_unfinished():
            deltas = engine.step()
            now = time.perf_counter()
            idle = 0 if deltas else idle + 1
            if idle > MAX_IDLE_STEPS:
                engine.abort(rid)
                raise RuntimeError(f"the engine made no progress on a {len(prompt)}-token prompt "
                                   f"in {MAX_IDLE_STEPS} steps (KV pool too small?)")
            for d in deltas:
                if d.request_id == rid:
                    times += [now] * len(d.token_ids)
                    cached = d.num_cached_tokens
        assert len(times) == max_tokens, f"asked {max_tokens} tokens, got {len(times)}"
        return StreamTiming(start, times, len(prompt), cached)

    def batch(self, prompts: list[list[int]], max_tokens: int) -> BatchTiming:
        engine = self.engine
        assert not engine.has_unfinished()
        start = time.perf_counter()
        ids = [engine.add_request(p, greedy(max_tokens)) for p in prompts]
        counts = dict.fromkeys(ids, 0)
        idle = 0
        while engine.has_unfinished():
            deltas = engine.step()
            idle = 0 if deltas else idle + 1
            if idle > MAX_IDLE_STEPS:
                for i in ids:
                    engine.abort(i)
                raise RuntimeError(f"the engine made no progress on {len(prompts)} requests in {MAX_IDLE_STEPS} steps")
            for d in deltas:
                counts[d.request_id] += len(d.token_ids)
        wall = time.perf_counter() - start
        per = [counts[i] for i in ids]
        return BatchTiming(wall, sum(per), len(prompts), per)

    def describe(self) -> dict:
        cfg = self.engine.cfg
        return {
            "engine": "localserve",
            "source": self.loaded.source,
            "backend": self.loaded.backend_name,
            "load_seconds": round(self.loaded.load_seconds, 3),
            "block_size": cfg.block_size,
            "max_num_seqs": cfg.max_num_seqs,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "prefix_cache": cfg.enable_prefix_cache,
            "batch_mode": self.batch_mode,
        }

    def close(self) -> None:
        close = getattr(self.engine.backend, "close", None)
        if close is not None:
            close()
