"""Why Show b's throughput varies between runs: b (1,000 prompts, all at once) three times on
one llama-3.1-8b backend and engine, per weight format, each with the GPU idle share, the
host's parts per step and the longest engine steps (a stall of a JIT compile or of a library's
first call for a shape shows as one step of hundreds of ms). One device call.

    python3 benchmarks/scripts/b_variance.py --out $OUT --budget 300 [--formats fp8,auto] [--seqs 1024]
        [--profile]   # then one more run under torch's profiler: device ms per kernel class
    python3 benchmarks/scripts/b_variance.py --out /tmp/x --cpu     # dry run here, tiny model
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_harness import Bench  # noqa: E402  (maps localserve.backends on the device)
from gpu_timing import kernel_table  # noqa: E402


def timed_batch(b: Bench, eng, prompts, outs) -> dict:
    """b.run_batch and its slowest engine steps."""
    seconds: list[float] = []
    r = b.run_batch(eng, prompts, outs, seconds)
    d = np.asarray(seconds) * 1e3
    return {k: r[k] for k in ("output_tok_s", "wall_s", "steps")} | {
        "step_ms_p50": round(float(np.median(d)), 2),
        "step_ms_max5": [round(float(x), 1) for x in np.sort(d)[-5:][::-1]],
        "steps_over_100ms": int((d > 100).sum())}


def profiled(b: Bench, eng, prompts, outs) -> dict:
    """One more run under torch's profiler (CUDA kernels only): device seconds per kernel class
    over the whole run, against its wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    eng.reset_prefix_cache()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = b.run_batch(eng, prompts, outs)
        torch.cuda.synchronize()
    table = kernel_table(prof, 1, top=25)
    return {"wall_s": r["wall_s"], "output_tok_s": r["output_tok_s"],
            "device_s": {k: round(v / 1e3, 3) for k, v in table["ms"].items()},
            "launches": table["count"], "top_ms": table["top"]}


def variance(b: Bench, fmt: str) -> dict:
    model = b.models["llama"]
    seqs, tokens = (8, 256) if b.cpu else (b.args.seqs, 8192)
    be, cfg, load_s = b.backend(model, seqs, tokens, weight_format=fmt)
    eng, kv_s = b.engine(be, cfg, seqs, tokens)
    n = max(8, int(1000 * b.scale))
    ins, outs = b.sharegpt_like(n)
    if b.cpu:  # the dry run: short prompts and outputs (Triton's interpreter is slow)
        ins, outs = np.minimum(ins, 12), np.minimum(outs, 4)
    prompts = b.rand_prompts(cfg.vocab_size, ins, 0)
    d = be.describe()
    res = {"weights": d["weights"], "load_s": round(load_s, 1), "kv_and_graphs_s": round(kv_s, 1),
           "piecewise_buckets": len(d["piecewise_graphs"]), "num_blocks": d["num_blocks"],
           "runs": []}
    for i in range(3):
        eng.reset_prefix_cache()
        (r, host), idle = b.idle_share(be, lambda: b.host_breakdown(
            eng, lambda: timed_batch(b, eng, prompts, outs)))
        r |= {"gpu_idle_share": round(idle, 4), "host_ms_per_step": host,
              "piecewise_steps": be.piecewise.steps if be.piecewise is not None else 0}
        res["runs"].append(r)
        b.log(fmt, i, r)
    if b.args.profile and not b.cpu:
        res["profile"] = profiled(b, eng, prompts, outs)
        b.log(fmt, "profile", res["profile"])
    b.free(be)
    eng = be = None
    b.free()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--formats", default="fp8,auto")
    ap.add_argument("--seqs", type=int, default=512, help="max_num_seqs (the Show's b: 1024)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    b = Bench(args)
    b.results["command"] = "b_variance: " + b.results["command"]
    b.section("env", 5, b.env)
    for fmt in args.formats.split(","):
        b.section(f"b_{fmt}", 60, variance, b, fmt)
    b.save()


if __name__ == "__main__":
    main()
