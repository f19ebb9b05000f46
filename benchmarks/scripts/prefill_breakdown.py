"""Where a cold CPU prefill spends its time: wall time of the Q8 linears and of paged attention
while one prompt of random ids is prefilled by the default model (backends/cpu/PERF.md).

    .venv/bin/python benchmarks/scripts/prefill_breakdown.py PROMPT_TOKENS STEP_TOKENS
"""

import sys, time, collections
import numpy as np, torch
from localserve.engine.backend import BackendConfig
from localserve.engine.llm_engine import EngineConfig
from localserve.engine.sampling_params import SamplingParams
from localserve.runtime.loader import load_model, warm_up
from localserve.backends.torch_common import layers as L, attention as A
acc = collections.Counter()
def wrap(cls, meth, label):
    orig = getattr(cls, meth)
    def f(self, *a, **k):
        t = time.perf_counter(); r = orig(self, *a, **k); acc[label] += time.perf_counter() - t; return r
    setattr(cls, meth, f)
wrap(L.Q8KernelLinear, "__call__", "q8 linear")
wrap(A.TorchPagedAttention, "forward", "attention")
n = int(sys.argv[1]); chunk = int(sys.argv[2])
loaded = load_model(None, backend="cpu", backend_cfg=BackendConfig(max_num_seqs=8, max_num_batched_tokens=chunk, memory_utilization=0.1),
                    engine_cfg=EngineConfig(max_num_seqs=8, max_num_batched_tokens=chunk))
eng = loaded.engine; warm_up(eng); acc.clear()
ids = np.random.default_rng(0).integers(1000, 200000, n).tolist()
t = time.perf_counter()
eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0))
while eng.has_unfinished(): eng.step()
total = time.perf_counter() - t
print(f"n={n} chunk={chunk} total {total:.2f}s ({n/total:.0f} tok/s)", {k: round(v, 2) for k, v in acc.items()}, "other", round(total - sum(acc.values()), 2))
