"""Overlap scheduling on the GPU, one device call: conformance with overlap on, then Show a
(bs1 decode), b (1,000 prompts) and e (gemma idle share), each with overlap off and on over the
same backend and engine (EngineConfig.async_scheduling; the engine's flag is switched between
runs while nothing is in flight). Reuses scripts/gpu_bench.py's building blocks.

`--ab pinned`: overlap stays on, and "off" / "on" become the backend's pinned input staging off
(pageable copies, FlashInfer's synchronous page-index copy: the behaviour before staging.py) /
on, switched on the same backend between runs. It also lists the synchronising CUDA calls of a
few overlapped steps (torch.cuda.set_sync_debug_mode("warn")) with staging off and on.

    python3 scripts/overlap_bench.py --out $OUT --budget 500 [--ab pinned]
    python3 scripts/overlap_bench.py --out /tmp/x --cpu        # dry run here, tiny models
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import Bench  # noqa: E402  (importing it maps localserve.backends on the device)


def conformance_overlap(b: Bench) -> dict:
    os.environ["LOCALSERVE_ASYNC_SCHEDULING"] = "1"
    try:
        return b.conformance()
    finally:
        os.environ.pop("LOCALSERVE_ASYNC_SCHEDULING", None)


AB = {"mode": "overlap"}  # set from --ab


def switch(eng, be, on: bool) -> None:
    """The A/B switch between runs (nothing in flight): the engine's overlap, or (--ab pinned,
    overlap on) the backend's pinned staging."""
    if AB["mode"] == "pinned":
        eng.async_scheduling = True
        be.staging.set_enabled(on)
    else:
        eng.async_scheduling = on


def sync_check(b: Bench) -> dict:
    """Synchronising CUDA calls (torch's sync debug mode) in a few overlapped gemma steps:
    one stream of 24 tokens and a batch of 8, with staging off and on."""
    if b.cpu:
        return {"skipped": "cpu"}
    import torch

    be, cfg, _ = b.backend(b.models["gemma"], 64, 2048)
    eng, _ = b.engine(be, cfg, 64, 2048)
    p = b.rand_prompts(cfg.vocab_size, [100] * 8, 7)
    out = {}
    for on in (False, True, False, True):
        eng.async_scheduling = True
        be.staging.set_enabled(on)
        b.stream(eng, p[0], 4)  # warm-up outside the check
        eng.reset_prefix_cache()
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                b.stream(eng, p[0], 24)
                eng.reset_prefix_cache()
                b.run_batch(eng, p, [12] * 8)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        eng.reset_prefix_cache()
        sites: dict[str, int] = {}
        for w in got:
            if "synchroniz" in str(w.message):
                key = f"{Path(w.filename).name}:{w.lineno}: {str(w.message)[:90]}"
                sites[key] = sites.get(key, 0) + 1
        out["pinned" if on else "pageable"] = {"syncs": sum(sites.values()), "sites": sites}
        b.log("sync", on, sites)
    b.free(be)
    return out


def timed_host(b: Bench, eng, fn):
    """fn()'s result with the host parts per step (schedule, update, deltas) in ms."""
    try:
        return b.host_breakdown(eng, fn)
    except Exception as exc:
        return fn(), {"error": repr(exc)}


def llama(b: Bench) -> dict:
    res = {}
    max_seqs = 8 if b.cpu else 512
    max_tokens = 256 if b.cpu else 8192
    be, cfg, load_s = b.backend(b.models["llama"], max_seqs, max_tokens)
    eng, kv_s = b.engine(be, cfg, max_seqs, max_tokens)
    res["load"] = {"weights_s": round(load_s, 1), "kv_and_graphs_s": round(kv_s, 1), **be.describe()}
    b.log("loaded", res["load"])
    n_in, n_out = (16, 24) if b.cpu else (128, 512)
    p = b.rand_prompts(cfg.vocab_size, [n_in], 1)[0]
    # a: bs1 decode, off / on alternating, 2 runs each
    a = {"off": [], "on": []}
    for overlap in (False, True):
        switch(eng, be, overlap)
        b.stream(eng, p, 32)  # warm-up
    for rep in range(2):
        for overlap in (False, True):
            switch(eng, be, overlap)
            eng.reset_prefix_cache()
            (r, host), idle = b.idle_share(be, lambda: timed_host(b, eng, lambda: b.stream(eng, p, n_out)))
            r["gpu_idle_share"] = round(idle, 4)
            r["host_ms_per_step"] = host
            a["on" if overlap else "off"].append(r)
    for k in ("off", "on"):
        a[k + "_decode_tok_s_median"] = float(np.median([r["decode_tok_s"] for r in a[k]]))
    res["a_bs1_decode"] = a
    b.log("a", json.dumps(a))
    b.results["sections"]["llama"] = res
    b.save()
    # b: 1,000 prompts, off then on (then on again if time allows)
    n = max(8, int(1000 * b.scale))
    ins, outs = b.sharegpt_like(n)
    prompts = b.rand_prompts(cfg.vocab_size, ins, 0)
    bres = {}
    order = [False, True, True, False] if not b.cpu else [False, True]
    for i, overlap in enumerate(order):
        if b.left() < 45:
            bres[f"run{i}"] = {"skipped": f"{b.left():.0f}s left"}
            break
        switch(eng, be, overlap)
        eng.reset_prefix_cache()
        b.run_batch(eng, prompts[:16], np.minimum(outs[:16], 8))  # warm-up
        eng.reset_prefix_cache()
        (r, host), idle = b.idle_share(be, lambda: timed_host(b, eng, lambda: b.run_batch(eng, prompts, outs)))
        r["gpu_idle_share"] = round(idle, 4)
        r["host_ms_per_step"] = host
        r["overlap"] = overlap
        bres[f"run{i}"] = r
        b.log("b", overlap, json.dumps(r))
        res["b_offline"] = bres
        b.results["sections"]["llama"] = res
        b.save()
    b.free(be)
    return res


def show_e(b: Bench) -> dict:
    out = {}
    be, cfg, _ = b.backend(b.models["gemma"], 64, 2048)
    eng, _ = b.engine(be, cfg, 64, 2048)
    n_out = 16 if b.cpu else 256
    p = b.rand_prompts(cfg.vocab_size, [128 if not b.cpu else 12] * 64, 5)
    for overlap in (False, True, False, True):
        switch(eng, be, overlap)
        b.stream(eng, p[0], 8)
        (r1, h1), i1 = b.idle_share(be, lambda: timed_host(b, eng, lambda: b.stream(eng, p[0], n_out)))
        eng.reset_prefix_cache()
        b.run_batch(eng, p[:8], [4] * 8)
        eng.reset_prefix_cache()
        (r64, h64), i64 = b.idle_share(be, lambda: timed_host(b, eng, lambda: b.run_batch(eng, p, [n_out] * 64)))
        eng.reset_prefix_cache()
        key = "on" if overlap else "off"
        out.setdefault(key, []).append(
            {"bs1_idle": round(i1, 4), "bs1_decode_tok_s": r1["decode_tok_s"],
             "bs64_idle": round(i64, 4), "bs64_output_tok_s": r64["output_tok_s"],
             "bs1_host_ms": h1, "bs64_host_ms": h64})
        b.log("e", key, out[key][-1])
        if b.left() < 20:
            break
    out["graphs"] = list(be.graphs.buckets) if be.graphs is not None else []
    b.free(be)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget", type=float, default=500.0)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ab", choices=("overlap", "pinned"), default="overlap")
    args = ap.parse_args()
    AB["mode"] = args.ab
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    b = Bench(args)
    b.results["command"] = "overlap_bench: " + b.results["command"]
    b.results["ab"] = {"mode": args.ab, "off": "pageable staging, overlap on" if args.ab == "pinned"
                       else "overlap off", "on": "pinned staging, overlap on" if args.ab == "pinned"
                       else "overlap on"}
    b.section("env", 5, b.env)
    b.section("conformance_overlap", 30, conformance_overlap, b)
    if args.ab == "pinned":
        b.section("sync_check", 25, sync_check, b)
    b.section("e_idle_overlap", 40, show_e, b)
    b.section("llama", 100, llama, b)
    b.results["total_s"] = round(time.monotonic() - b.t0, 1)
    b.save()
    b.log("done")


if __name__ == "__main__":
    main()
