"""Overlap scheduling on the GPU, one device call: conformance with overlap on, then Show a
(bs1 decode), b (1,000 prompts) and e (gemma idle share), each with overlap off and on over the
same backend and engine (EngineConfig.async_scheduling; the engine's flag is switched between
runs while nothing is in flight). Reuses benchmarks/scripts/gpu_harness.py's building blocks.

`--ab pinned`: overlap stays on, and "off" / "on" become the backend's pinned input staging off
(pageable copies, FlashInfer's synchronous page-index copy: the behaviour before staging.py) /
on, switched on the same backend between runs. It also lists the synchronising CUDA calls of a
few overlapped steps (torch.cuda.set_sync_debug_mode("warn")) with staging off and on.

`--ab shape`: overlap and pinned staging on; Show b under batch shapes (max_num_seqs,
max_num_batched_tokens) = the current (512, 8192) and candidates past the 512 graph bucket,
alternating A B C C B A over one backend captured up to 1,024 (engines over the same pages);
each step's device time and shape (decode rows, prompt tokens) are recorded (mixed vs
decode-only cost); decode-graph replays at bs 512 / 768 / 1,024; a (bs1) once.

    python3 benchmarks/scripts/overlap_bench.py --out $OUT --budget 500 [--ab pinned]
    python3 benchmarks/scripts/overlap_bench.py --out /tmp/x --cpu        # dry run here, tiny models
    python3 benchmarks/scripts/overlap_bench.py --simulate                # b's step shapes, no device
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
from gpu_harness import Bench  # noqa: E402  (importing it maps localserve.backends on the device)


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


SHAPES = {"cur_512x8k": (512, 8192), "s1024x8k": (1024, 8192), "s1024x16k": (1024, 16384)}


def _plan_shape(plan) -> tuple[int, int]:
    q = np.diff(np.asarray(plan.query_start_loc))
    d = int((q == 1).sum())
    return d, int(plan.num_tokens) - d


def step_profile(b: Bench, be, fn) -> tuple[dict, float, dict]:
    """fn()'s result, the GPU idle share, and each step's device ms grouped by its shape:
    decode-only steps by batch (graph replay) and mixed steps (eager, prompt tokens)."""
    import torch

    shapes: list[tuple[int, int]] = []
    originals = []
    for attr in ("execute", "execute_async"):
        f = getattr(be, attr)
        originals.append(attr)

        def g(plan, _f=f):
            if plan.num_tokens:
                shapes.append(_plan_shape(plan))
            return _f(plan)
        setattr(be, attr, g)
    be.step_events = []
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        res = fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        ms = np.array([a.elapsed_time(e) for a, e in be.step_events])
    finally:
        be.step_events = None
        for attr in originals:
            delattr(be, attr)
    k = min(len(shapes), len(ms))
    ms, sh = ms[:k], np.array(shapes[:k]).reshape(-1, 2)
    dec, pre = sh[:, 0], sh[:, 1]
    groups = {"decode bs<=128": (pre == 0) & (dec <= 128),
              "decode 129-512": (pre == 0) & (dec > 128) & (dec <= 512),
              "decode >512": (pre == 0) & (dec > 512),
              "mixed": pre > 0}
    prof = {}
    for k, m in groups.items():
        if not m.any():
            continue
        tok = int(dec[m].sum() + pre[m].sum())
        prof[k] = {"steps": int(m.sum()), "device_s": round(float(ms[m].sum()) / 1e3, 3),
                   "decode_rows": int(dec[m].sum()), "prompt_tokens": int(pre[m].sum()),
                   "us_per_token": round(float(ms[m].sum()) * 1e3 / max(1, tok), 2),
                   "mean_step_ms": round(float(ms[m].mean()), 3)}
    if (pre > 0).sum() >= 3:  # mixed step ms ~ a + b * prompt tokens + c * decode rows
        m = pre > 0
        A = np.stack([np.ones(m.sum()), pre[m], dec[m]], 1)
        coef = np.linalg.lstsq(A, ms[m], rcond=None)[0]
        prof["mixed_fit_ms"] = {"fixed": round(float(coef[0]), 3),
                                "per_prompt_token_us": round(float(coef[1]) * 1e3, 3),
                                "per_decode_row_us": round(float(coef[2]) * 1e3, 3)}
    prof["device_s"] = round(float(ms.sum()) / 1e3, 3)
    return res, 1.0 - float(ms.sum()) / 1e3 / wall, prof


def shape_ab(b: Bench) -> dict:
    """Show b under the batch shapes of SHAPES, alternating, over one backend."""
    res = {}
    top_seqs = 16 if b.cpu else max(s for s, _ in SHAPES.values())
    top_tok = 256 if b.cpu else max(t for _, t in SHAPES.values())
    be, cfg, load_s = b.backend(b.models["llama"], top_seqs, top_tok)
    engines = {}
    kv_s = 0.0
    for name, (seqs, tok) in SHAPES.items():
        if b.cpu:
            seqs, tok = max(2, seqs // 64), max(64, tok // 64)
        eng, t = b.engine(be, cfg, seqs, tok, num_blocks=be.num_blocks or None)
        engines[name] = eng
        kv_s += t
    res["load"] = {"weights_s": round(load_s, 1), "kv_and_graphs_s": round(kv_s, 1), **be.describe(),
                   "shapes": {k: list(v) for k, v in SHAPES.items()}}
    b.log("loaded", res["load"])
    b.results["sections"]["shape"] = res
    if not b.cpu:
        res["replay_ctx384"] = [b.replay_timing(be, bs, 384) for bs in (512, 768, 1024)
                                if bs <= be.graphs.max_batch]
        b.log("replay", res["replay_ctx384"])
    n = max(8, int(1000 * b.scale))
    ins, outs = b.sharegpt_like(n)
    if b.cpu:  # the dry run checks the plumbing only
        ins, outs = np.minimum(ins, 24), np.minimum(outs, 4)
    prompts = b.rand_prompts(cfg.vocab_size, ins, 0)
    names = list(SHAPES)
    order = names + names[::-1]
    runs = {}
    for i, name in enumerate(order):
        if b.left() < 40:
            runs[f"run{i}_{name}"] = {"skipped": f"{b.left():.0f}s left"}
            break
        eng = engines[name]
        eng.reset_prefix_cache()
        b.run_batch(eng, prompts[:16], np.minimum(outs[:16], 8))  # warm-up
        eng.reset_prefix_cache()
        if b.cpu:
            r, idle, prof = b.run_batch(eng, prompts, outs), float("nan"), {}
        else:
            r, idle, prof = step_profile(b, be, lambda: b.run_batch(eng, prompts, outs))
        eng.reset_prefix_cache()
        r["gpu_idle_share"] = round(idle, 4)
        r["shape"] = list(SHAPES[name])
        r["steps_by_shape"] = prof
        runs[f"run{i}_{name}"] = r
        b.log("b", name, json.dumps(r))
        res["b_offline"] = runs
        b.save()
    for name in names:
        got = [r["output_tok_s"] for k, r in runs.items() if k.endswith(name) and "output_tok_s" in r]
        if got:
            res.setdefault("b_mean_output_tok_s", {})[name] = round(float(np.mean(got)), 1)
    # a: bs1 decode once, through the engine of the best shape
    best = max(res.get("b_mean_output_tok_s", {names[0]: 0}).items(), key=lambda kv: kv[1])[0]
    n_in, n_out = (8, 6) if b.cpu else (128, 512)
    p = b.rand_prompts(cfg.vocab_size, [n_in], 1)[0]
    eng = engines[best]
    eng.reset_prefix_cache()
    b.stream(eng, p, 4 if b.cpu else 32)
    eng.reset_prefix_cache()
    r, idle = b.idle_share(be, lambda: b.stream(eng, p, n_out))
    r["gpu_idle_share"] = round(idle, 4)
    r["engine_shape"] = best
    res["a_bs1_decode"] = r
    b.log("a", r)
    b.save()
    b.free(be)
    return res


def simulate_shapes(shapes=((512, 8192), (512, 16384), (768, 8192), (1024, 2048),
                             (1024, 4096), (1024, 8192), (1024, 16384)), num_blocks: int = 26635):
    """Show b's steps through the real scheduler over a no-op backend (CPU, ~2 s a shape) and
    the cost model benchmarks/GPU_NOTES.md "Batch shape" predicted with: ms per step = max(5.4, 22.9 us x
    tokens) [GEMMs: weight read or 700 TFLOP/s] + 45 ns x KV tokens read by decode rows + 0.5
    (graph step) or 1.5 (eager mixed step)."""
    from sched_microbench import NoOpBackend

    from localserve.engine.llm_engine import EngineConfig, LLMEngine
    from localserve.engine.sampling_params import SamplingParams
    from localserve.models.config import ModelConfig

    class Recorder(NoOpBackend):
        def __init__(self) -> None:
            self.steps: list[tuple[int, int, int]] = []

        def kv_capacity(self, block_size: int) -> int:
            return num_blocks

        def execute(self, plan):
            q = np.diff(np.asarray(plan.query_start_loc))
            dec = q == 1
            self.steps.append((int(dec.sum()), int(q[~dec].sum()),
                               int(np.asarray(plan.seq_lens)[dec].sum())))
            return super().execute(plan)

    cfg = ModelConfig(architecture="llama", vocab_size=1000, hidden_size=8, intermediate_size=16,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, max_context=131072,
                      rms_norm_eps=1e-6, rope_theta=1e4, eos_token_ids=(0,))
    rng = np.random.default_rng(0)
    ins, outs = rng.integers(4, 401, 1000), rng.integers(4, 359, 1000)
    rows = []
    for seqs, tok in shapes:
        be = Recorder()
        eng = LLMEngine(be, cfg, None, EngineConfig(block_size=16, max_num_seqs=seqs,
                        max_num_batched_tokens=tok, async_scheduling=False))
        r2 = np.random.default_rng(0)
        for i, o in zip(ins, outs):
            eng.add_request(r2.integers(1, 1000, int(i)).tolist(), SamplingParams(
                temperature=0.0, max_tokens=int(o), ignore_eos=True, seed=0))
        while eng.has_unfinished():
            eng.step()
        st = np.array(be.steps)
        d, p, kv = st.T
        ms = np.maximum(5.4, (d + p) * 22.9e-3) + kv * 45e-6 + np.where(p > 0, 1.5, 0.5)
        rows.append({"shape": [seqs, tok], "steps": len(st), "mixed_steps": int((p > 0).sum()),
                     "steps_lt_128_tokens": int((d + p < 128).sum()),
                     "model_s": round(float(ms.sum()) / 1e3, 2),
                     "model_out_tok_s": round(float(outs.sum()) / (float(ms.sum()) / 1e3))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget", type=float, default=500.0)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ab", choices=("overlap", "pinned", "shape"), default="overlap")
    ap.add_argument("--simulate", action="store_true", help="b's step shapes on the CPU only")
    args = ap.parse_args()
    if args.simulate:
        simulate_shapes()
        return
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
    if args.ab == "shape":
        b.results["ab"] = {"mode": "shape", "shapes": {k: list(v) for k, v in SHAPES.items()}}
        b.section("shape", 120, shape_ab, b)
        b.results["total_s"] = round(time.monotonic() - b.t0, 1)
        b.save()
        b.log("done")
        return
    if args.ab == "pinned":
        b.section("sync_check", 25, sync_check, b)
    b.section("e_idle_overlap", 40, show_e, b)
    b.section("llama", 100, llama, b)
    b.results["total_s"] = round(time.monotonic() - b.t0, 1)
    b.save()
    b.log("done")


if __name__ == "__main__":
    main()
