"""Python's garbage collector tuned for a serving process.

The engine loop allocates many short-lived objects per step (plans, deltas, and on the GPU the
eager forward's tensors and wrappers). With CPython's default thresholds (700 allocations for a
young collection) the collector runs several times a step, and its older generations walk
every object the process holds: the model's modules, the tokenizer's tables, every request.
On the H100 that cost 9 ms of host time per step in a 512-row shared-prefix decode
(benchmarks/GPU_NOTES.md, "Python's GC"): with the GPU waiting on the host, 18% of the throughput.

`tune_gc()` does what vLLM's engine core does after start-up: one full collection, then
`gc.freeze()` moves everything alive (weights' Python objects, tokenizer, config) into the
permanent generation that collections skip; and the young generation's threshold goes from 700
to 50,000 so collections run about 70x less often. Reference cycles are still collected.
LOCALSERVE_GC=default leaves the collector as it is; LOCALSERVE_GC_THRESHOLD sets gen0's
threshold.
"""

from __future__ import annotations

import gc

from localserve import envs

DEFAULT_GEN0_THRESHOLD = envs.GC_THRESHOLD.default_value


def tune_gc() -> dict:
    """Freeze what is alive now and raise the young generation's threshold; returns what was
    done (for logs and /api/status). Call once the model is loaded."""
    if envs.GC.get() == "default":
        return {"gc": "default", "threshold": list(gc.get_threshold())}
    gen0 = envs.GC_THRESHOLD.get()
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)
    return {"gc": "tuned", "threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count()}
