"""Where the host's time goes in Show e (gemma-3-270m, graphs + overlap, batch 1 and 64), one
device call: the GPU idle share and the host parts per step (Bench.host_breakdown), then the same
runs under cProfile, whose top functions by own time and by cumulative time are written to
$OUT/host_profile_{bs1,bs64}.txt (and the raw stats in .prof files). The idle share is measured without cProfile (it slows the
host by ~2x); the profile says which functions to cut. First, `memo_check`: greedy tokens with
the FlashInfer plan memo (flashinfer_attention.fill_graph_metadata) on vs re-planning every
step must be identical; e's figures are taken with the memo on and off, alternating.

    python3 benchmarks/scripts/host_profile.py --out $OUT --budget 200
    python3 benchmarks/scripts/host_profile.py --out /tmp/x --cpu     # dry run here, tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_harness import Bench  # noqa: E402  (importing it maps localserve.backends on the device)
from gpu_timing import time_calls  # noqa: E402


def profiled(fn, path: Path, top: int = 45):
    pr = cProfile.Profile()
    pr.enable()
    try:
        res = fn()
    finally:
        pr.disable()
    pr.dump_stats(str(path.with_suffix(".prof")))  # for pstats here (print_callees etc.)
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    path.write_text(buf.getvalue())
    return res


class ReplanAlways:
    """Context: the graph path re-plans FlashInfer every step for the step's own pages (the
    plan memo off, "headroom" plans made exact; "fixed" graphs have no split-KV to plan), for
    A/Bs and as the reference of memo_check."""

    def __init__(self, be) -> None:
        self.att = be.model.attention if be.graphs is not None else None
        self.flipped = []

    def __enter__(self):
        att = self.att
        if att is not None and hasattr(att, "fill_graph_metadata"):
            fill = att.fill_graph_metadata

            def forced(meta, *a, **k):
                for pages, _ in meta.page_sets or ():
                    pages.planned = None
                    if pages.mode == "headroom":
                        pages.mode = "exact"
                        self.flipped.append(pages)
                if meta.level0 is not None:
                    meta.level0.planned = None
                return fill(meta, *a, **k)
            att.fill_graph_metadata = forced
        return self

    def __exit__(self, *exc) -> None:
        if self.att is not None and "fill_graph_metadata" in vars(self.att):
            del self.att.fill_graph_metadata
        for pages in self.flipped:
            pages.mode, pages.planned = "headroom", None


def tokens(b: Bench, eng, prompts, n_out) -> list[list[int]]:
    ids = {eng.add_request(p, b.params(n_out)): i for i, p in enumerate(prompts)}
    out: list[list[int]] = [[] for _ in prompts]
    while eng.has_unfinished():
        for d in eng.step():
            out[ids[d.request_id]].extend(d.token_ids)
    return out


def memo_check(b: Bench) -> dict:
    """Greedy tokens with the FlashInfer plan memo on vs re-planning every step for the true
    pages, on gemma (tensor-core decode, sliding window: "headroom" plans) and qwen3 (CUDA-core
    decode: "exact" plans): a skipped plan writes the same work partition, and a headroom plan
    only adds empty chunks, so the tokens must be identical."""
    res = {}
    for key in ("gemma", "qwen"):
        be, cfg, _ = b.backend(b.models[key], 64, 2048)
        eng, _ = b.engine(be, cfg, 64, 2048, prefix_cache=False)
        rows = 4 if b.cpu else 64
        n_out = 8 if b.cpu else 200
        rng = np.random.default_rng(11)
        p = b.rand_prompts(cfg.vocab_size, rng.integers(5, 300 if not b.cpu else 20, rows), 7)
        memo = tokens(b, eng, p, n_out)
        with ReplanAlways(be):
            replan = tokens(b, eng, p, n_out)
        same = sum(a == c for a, c in zip(memo, replan))
        res[key] = {"sequences_equal": f"{same}/{rows}", "ok": same == rows,
                    "attention": be.attention_name,
                    "tensor_cores": getattr(be.model.attention, "tensor_cores", None)}
        b.log("memo", key, res[key])
        b.free(be)
        eng = be = None
        b.free()
    return res


def fine_breakdown(be, fn) -> tuple[object, dict]:
    """fn()'s result and execute_async's parts in ms per step: the graph prepare (inputs and
    attention metadata) and replay launch, the placeholder fill, the staging bracket, the
    sampler, the step handle (the ids' copy to pinned memory), and the rest."""
    mod = importlib.import_module(type(be).__module__)
    targets = [(be, "execute_async", "execute_async"), (be.graphs, "prepare", "graph_prepare"),
               (be.graphs, "replay", "graph_replay"), (be, "_fill_placeholders", "placeholders"),
               (be, "_mark_staged", "staging_end"), (be.staging, "begin", "staging_begin"),
               (mod, "sample_on_device", "sample"), (mod, "SubmittedStep", "handle")]
    parts: dict[str, float] = {}
    calls: dict[str, int] = {}
    with time_calls(targets, parts, calls):
        res = fn()
    steps = max(1, calls["execute_async"])
    ms = {k: round(v / steps * 1e3, 3) for k, v in parts.items()}
    ms["rest"] = round(ms["execute_async"] - sum(v for k, v in ms.items() if k != "execute_async"), 3)
    return res, ms | {"steps": steps}


def show_e_host(b: Bench) -> dict:
    out = {}
    be, cfg, _ = b.backend(b.models["gemma"], 64, 2048)
    eng, _ = b.engine(be, cfg, 64, 2048)
    n_out = 16 if b.cpu else 256
    rows = 4 if b.cpu else 64
    p = b.rand_prompts(cfg.vocab_size, [128 if not b.cpu else 12] * rows, 5)
    b.stream(eng, p[0], 8)
    b.run_batch(eng, p[:8], [4] * 8)
    runs = {"bs1": lambda: b.stream(eng, p[0], n_out),
            "bs64": lambda: b.run_batch(eng, p, [n_out] * rows)}
    for key, fn in runs.items():
        for rep in range(2):
            for memo in (True, False):  # the plan memo on, then off (A/B, alternating)
                with (contextlib.nullcontext() if memo else ReplanAlways(be)):
                    eng.reset_prefix_cache()
                    (r, host), idle = b.idle_share(be, lambda: b.host_breakdown(eng, fn))
                    eng.reset_prefix_cache()
                    r2, idle_plain = b.idle_share(be, fn)
                speed = r2.get("output_tok_s", r2.get("decode_tok_s"))
                out.setdefault(f"{key}_{'memo' if memo else 'replan'}", []).append(
                    {"idle": round(idle_plain, 4), "tok_s": speed, "idle_timed": round(idle, 4),
                     "host_ms_per_step": host})
                b.log(key, memo, out[f"{key}_{'memo' if memo else 'replan'}"][-1])
        if be.graphs is not None:
            eng.reset_prefix_cache()
            out[f"{key}_execute_async_ms"] = fine_breakdown(be, fn)[1]
            b.log(key, "execute_async", out[f"{key}_execute_async_ms"])
        eng.reset_prefix_cache()
        profiled(fn, b.out / f"host_profile_{key}.txt")
    out["overlap"] = eng.async_scheduling
    out["graphs"] = list(be.graphs.buckets) if be.graphs is not None else []
    b.free(be)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget", type=float, default=200.0)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    b = Bench(args)
    b.results["command"] = "host_profile: " + b.results["command"]
    b.section("env", 5, b.env)
    b.section("memo_check", 40, memo_check, b)
    b.section("e_host", 40, show_e_host, b)
    b.results["total_s"] = round(time.monotonic() - b.t0, 1)
    b.save()
    b.log("done", json.dumps(b.results["sections"].get("e_host", {}), default=str)[:2000])


if __name__ == "__main__":
    main()
