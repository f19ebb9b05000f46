"""CPU micro-benchmark of the engine's host work per step: 512 running sequences decoding over
a no-op backend (it returns token 1 for every row at once), so every microsecond measured is the
scheduler's or the engine's. Reports mean ms per step of schedule, update and the whole step.

    python3 benchmarks/scripts/sched_microbench.py [--seqs 512] [--steps 200] [--async-scheduling 0|1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localserve.engine.backend import BackendConfig, Buckets, DeviceInfo  # noqa: E402
from localserve.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from localserve.engine.plan import ForwardOutput, Plan  # noqa: E402
from localserve.engine.sampling_params import SamplingParams  # noqa: E402
from localserve.models.config import ModelConfig  # noqa: E402


class NoOpBackend:
    name = "noop"

    @classmethod
    def probe(cls):
        return [DeviceInfo("noop", "noop", 1 << 30)]

    def load(self, model, cfg: BackendConfig) -> None:
        pass

    def kv_capacity(self, block_size: int) -> int:
        return 1 << 16

    def init_kv(self, num_blocks: int, block_size: int) -> None:
        pass

    def shape_buckets(self) -> Buckets:
        return Buckets()

    def execute(self, plan: Plan) -> ForwardOutput:
        return ForwardOutput(token_ids=np.ones(len(plan.sample_idx), dtype=np.int64))

    def close(self) -> None:
        pass


class _Done:
    __slots__ = ("out",)

    def __init__(self, out):
        self.out = out

    def result(self):
        return self.out


class NoOpAsyncBackend(NoOpBackend):
    def execute_async(self, plan: Plan):
        return _Done(self.execute(plan))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--async-scheduling", type=int, default=0)
    args = ap.parse_args()
    cfg = ModelConfig(architecture="llama", vocab_size=1000, hidden_size=8, intermediate_size=16,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, max_context=4096,
                      rms_norm_eps=1e-6, rope_theta=1e4, eos_token_ids=(0,))
    be = NoOpAsyncBackend() if args.async_scheduling else NoOpBackend()
    ecfg = EngineConfig(block_size=16, max_num_seqs=args.seqs, max_num_batched_tokens=8192,
                        enable_prefix_cache=True)
    if hasattr(ecfg, "async_scheduling"):
        ecfg.async_scheduling = bool(args.async_scheduling)
    eng = LLMEngine(be, cfg, None, ecfg)
    rng = np.random.default_rng(0)
    p = SamplingParams(max_tokens=100000 // 100, temperature=0.0, ignore_eos=True)
    for _ in range(args.seqs):
        eng.add_request(rng.integers(1, 1000, args.prompt).tolist(), p)
    while len(eng.scheduler.running) < args.seqs or eng.scheduler.waiting:
        eng.step()  # prefills
    for _ in range(5):
        eng.step()
    sched = eng.scheduler
    times = {"schedule": 0.0, "update": 0.0}

    def timed(name, fn):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] += time.perf_counter() - t
        return g

    sched.schedule = timed("schedule", sched.schedule)
    sched.update = timed("update", sched.update)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    total = time.perf_counter() - t0
    res = {"seqs": args.seqs, "steps": args.steps, "async": args.async_scheduling,
           "schedule_ms": 1e3 * times["schedule"] / args.steps,
           "update_ms": 1e3 * times["update"] / args.steps,
           "step_ms": 1e3 * total / args.steps}
    res["deltas_and_rest_ms"] = res["step_ms"] - res["schedule_ms"] - res["update_ms"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
