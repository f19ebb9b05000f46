"""Shared-prefix (cascade) decode on the GPU, one device call: Show d (64 groups x 16 prompts,
a 2,048-token shared system prompt, 128-token questions, 256 output tokens) with the prefix
cache on and cascade on / off alternating over one backend, then the prefix cache off; the
greedy tokens of cascade on vs off side by side; whether the load-time check kept cascade.

    python3 benchmarks/scripts/cascade_bench.py --out $OUT --budget 540
    python3 benchmarks/scripts/cascade_bench.py --out /tmp/x --cpu      # dry run here (no FlashInfer:
                                                            # cascade stays off, tiny models)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_harness import Bench  # noqa: E402  (importing it maps localserve.backends on the device)
from gpu_timing import time_calls  # noqa: E402


def d_prompts(b: Bench, vocab: int):
    groups, per, sys_len, q_len, n_out = ((2, 4, 64, 8, 8) if b.cpu else (64, 16, 2048, 128, 256))
    rng = np.random.default_rng(3)  # the prompts of gpu_bench.py's show_d
    prompts = []
    for _ in range(groups):
        system = rng.integers(10, vocab - 10, sys_len).tolist()
        prompts += [system + rng.integers(10, vocab - 10, q_len).tolist() for _ in range(per)]
    order = rng.permutation(len(prompts))
    return [prompts[i] for i in order], np.full(len(prompts), n_out), groups, per


def run_collect(b: Bench, eng, prompts, outs) -> tuple[dict, list[list[int]]]:
    """b.run_batch's figures plus each request's output tokens and the step count."""
    ids = {}
    toks: dict[str, list[int]] = {}
    before = eng.stats()
    b.sync()
    t = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, outs)):
        ids[eng.add_request(p, b.params(n))] = i
    steps = 0
    while eng.has_unfinished():
        for d in eng.step():
            toks.setdefault(d.request_id, []).extend(d.token_ids)
        steps += 1
    wall = time.perf_counter() - t
    st = eng.stats()
    got = sum(len(v) for v in toks.values())
    assert got == int(sum(outs)), (got, int(sum(outs)))
    res = {"output_tokens": got, "wall_s": round(wall, 3), "output_tok_s": round(got / wall, 1),
           "steps": steps,
           "hit_rate": round((st.prefix_hit_tokens - before.prefix_hit_tokens)
                             / max(1, st.prefix_query_tokens - before.prefix_query_tokens), 4),
           "preemptions": st.num_preemptions - before.num_preemptions}
    out = [None] * len(prompts)
    for rid, i in ids.items():
        out[i] = toks[rid]
    return res, out


def sync_check(b: Bench, eng, prompts, outs) -> dict:
    """The synchronising CUDA calls (torch's sync debug mode) of 12 cascaded decode steps, by
    place: 256 of d's requests are prefilled first, then the steps are watched."""
    if b.cpu:
        return {"skipped": "cpu"}
    import collections
    import warnings

    import torch

    eng.reset_prefix_cache()
    for p, n in zip(prompts[:256], outs[:256]):
        eng.add_request(p, b.params(n))
    policy = eng.backend.model.attention.cascade
    before = policy.steps
    while policy.steps == before and eng.has_unfinished():
        eng.step()
    places: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(12):
                eng.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in got:
        places[f"{Path(w.filename).name}:{w.lineno}"] += 1
    while eng.has_unfinished():
        eng.step()
    return {"cascaded_steps_watched": policy.steps - before, "sync_calls": sum(places.values()),
            "by_place": dict(places.most_common(8))}


def graph_check(b: Bench, be) -> dict:
    """Before any request (the pages hold nothing yet): the smallest cascade graph's attention
    metadata, filled for a synthetic step (3 groups over 30 / 10 / 5 shared pages, loners,
    5 pad rows) and run eagerly on random queries and KV, against the fp32 reference and
    against the plain graph's metadata for the same step."""
    g = be.graphs
    if b.cpu or g is None or not g.cascade_buckets:
        return {"skipped": "no cascade graphs"}
    import torch

    from localserve.backends.cuda.cascade import find_shared_prefixes, reference_attention
    from localserve.backends.cuda.inputs import PaddedDecode
    from localserve.engine.plan import Plan, SamplingRow

    bucket, bs = g.cascade_buckets[0], be.block_size
    rng = np.random.default_rng(5)
    nxt = [0]

    def fresh(k):
        nxt[0] += k
        return list(range(nxt[0] - k, nxt[0]))

    rows = []
    for size, shared_pages in ((20, 30), (12, 10), (6, 5)):
        head = fresh(shared_pages)
        rows += [head + fresh(int(rng.integers(1, 4))) for _ in range(size)]
    while len(rows) < bucket - 5:
        rows.append(fresh(int(rng.integers(1, 9))))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    n = len(rows)
    tables = np.zeros((n, max(map(len, rows))), dtype=np.int32)
    lens = np.zeros(n, dtype=np.int32)
    for i, r in enumerate(rows):
        tables[i, :len(r)] = r
        lens[i] = (len(r) - 1) * bs + int(rng.integers(1, bs + 1))
    plan = Plan(seq_ids=list(range(n)), input_ids=np.zeros(n, np.int64),
                positions=lens.astype(np.int64) - 1, slot_mapping=np.zeros(n, np.int64),
                query_start_loc=np.arange(n + 1, dtype=np.int32), seq_lens=lens,
                block_tables=tables, sample_idx=np.arange(n, dtype=np.int32),
                sampling=[SamplingRow(params=b.params(1), seed=0, step=0)] * n, block_size=bs)
    shared = find_shared_prefixes(lens, tables, bs)
    att = be.model.attention
    layer = next(i for i, sl in enumerate(be.model.cfg.layer_is_sliding) if not sl)
    k_cache, v_cache = be.kv[layer]
    used = nxt[0] * bs
    for cache in (k_cache, v_cache):  # randn has no e4m3 kernel: drawn in float32, cast
        cache[:used] = torch.randn(cache[:used].shape, device=cache.device).to(cache.dtype)
    q = torch.randn(bucket, att.num_heads, att.head_dim, dtype=att.dtype, device=k_cache.device)
    padded = PaddedDecode.from_plan(plan, bucket, g.scratch_block)
    outs = {}
    for key, entry, sp in (("cascade", g.cascade_graphs[bucket], shared),
                           ("plain", g.graphs[bucket], None)):
        be.staging.begin()
        g._fill(entry[1], padded, be.staging, sp)
        be.staging.end()
        outs[key] = att.attend(q, k_cache, v_cache, entry[1], False).float()[:n]
    ref = reference_attention(q[:n], k_cache, v_cache, plan, att.scale).reshape(outs["plain"].shape)
    scale = float(ref.abs().max())
    err = {k: float((v - ref).abs().max()) for k, v in outs.items()}
    ok = err["cascade"] <= 2 * err["plain"] + 1e-2 * scale
    return {"bucket": bucket, "rows": n, "groups": shared.num_groups,
            "grouped_rows": len(shared.rows), "max_abs_err_vs_fp32": err,
            "value_scale": scale, "ok": bool(ok)}


def host_profile(b: Bench, be, eng, prompts, outs) -> dict:
    """Cascade on: the host parts of each step (b.host_breakdown, plus the attention's
    prepare and the eager forward's launches) and the idle share, with Python's GC on and
    then off (an eager step makes many small objects)."""
    import gc

    att = be.model.attention
    model = be.model
    out = {}
    for label, gc_on in (("gc_on", True), ("gc_off", False)):
        extra: dict[str, float] = {}
        if not gc_on:
            gc.collect()
            gc.disable()
        try:
            eng.reset_prefix_cache()
            with time_calls([(att, "prepare", "prepare"), (model, "forward", "forward")],
                            extra, {}):
                ((r, _), host), idle = b.idle_share(be, lambda: b.host_breakdown(
                    eng, lambda: run_collect(b, eng, prompts, outs)))
        finally:
            gc.enable()
        n = max(1, host.get("steps", 1))
        host.update({k + "_ms": round(v / n * 1e3, 3) for k, v in extra.items()})
        out[label] = {"output_tok_s": r["output_tok_s"], "wall_s": r["wall_s"],
                      "gpu_idle_share": round(idle, 4), "host_ms_per_step": host}
        b.log(label, json.dumps(out[label]))
    return out


def show_d(b: Bench) -> dict:
    max_seqs = 8 if b.cpu else b.args.max_seqs
    max_tokens = 256 if b.cpu else 8192
    be, cfg, load_s = b.backend(b.models["llama"], max_seqs, max_tokens)
    eng, kv_s = b.engine(be, cfg, max_seqs, max_tokens)
    policy = getattr(be.model.attention, "cascade", None)
    res = {"load": {"weights_s": round(load_s, 1), "kv_and_graphs_s": round(kv_s, 1),
                    **be.describe()},
           "cascade_available": policy is not None,
           "cascade_min_saved_gb": None if policy is None else policy.min_saved_bytes / 2**30}
    b.log("loaded", json.dumps(res))
    res["cascade_graph_buckets"] = list(be.graphs.cascade_buckets) if be.graphs else []
    try:
        import torch

        with torch.inference_mode():  # the KV pages are inference tensors
            res["graph_check"] = graph_check(b, be)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        res["graph_check"] = {"error": f"{type(exc).__name__}: {exc}"}
    b.log("graph_check", json.dumps(res["graph_check"]))
    prompts, outs, groups, per = d_prompts(b, cfg.vocab_size)
    res.update(groups=groups, per_group=per, max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens)
    # warm-up: one group, both ways (JIT of the level-0 prefill plan and merge_state)
    for on in (True, False):
        if policy is not None:
            policy.enabled = on
        eng.reset_prefix_cache()
        run_collect(b, eng, prompts[:per * 2], np.minimum(outs[:per * 2], 16))
    if policy is not None:
        policy.enabled = True
    if b.args.host_profile:
        res["host_profile"] = host_profile(b, be, eng, prompts, outs)
        b.free(be)
        return res
    tokens = {}
    runs = {"on": [], "off": []}
    for key in ("on", "off", "off", "on"):
        if b.left() < (45 if key == "on" else 60) + 150:
            break
        if policy is not None:
            policy.enabled = key == "on"
        steps0, saved0 = (policy.steps, policy.saved_tokens) if policy else (0, 0)
        graph0 = be.graphs.cascade_steps if be.graphs is not None else 0
        eng.reset_prefix_cache()
        (r, toks), idle = b.idle_share(be, lambda: run_collect(b, eng, prompts, outs))
        r["gpu_idle_share"] = round(idle, 4)
        if policy is not None:
            r["cascaded_steps"] = policy.steps - steps0
            r["saved_kv_tokens"] = policy.saved_tokens - saved0
            r["cascade_graph_steps"] = (be.graphs.cascade_steps if be.graphs else 0) - graph0
        runs[key].append(r)
        tokens.setdefault(key, toks)
        b.log(f"cascade {key}", json.dumps(r))
        res["runs"] = runs
        b.results["sections"]["d"] = res
        b.save()
    if policy is not None:
        policy.enabled = True
        res["sync_check"] = sync_check(b, eng, prompts, outs)
    if "on" in tokens and "off" in tokens:
        same = [a == c for a, c in zip(tokens["on"], tokens["off"])]
        first = [next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), len(a))
                 for a, c in zip(tokens["on"], tokens["off"])]
        res["greedy_on_vs_off"] = {"identical_requests": int(sum(same)), "requests": len(same),
                                   "median_first_difference": float(np.median(first))}
    for k in ("on", "off"):
        if runs[k]:
            res[f"cache_on_cascade_{k}_tok_s_median"] = float(np.median(
                [r["output_tok_s"] for r in runs[k]]))
    if b.left() > 150 and not b.args.skip_off:
        off_eng, _ = b.engine(be, cfg, max_seqs, max_tokens, prefix_cache=False,
                              num_blocks=be.num_blocks)
        r, _ = run_collect(b, off_eng, prompts, outs)
        res["cache_off"] = r
        on = res.get("cache_on_cascade_on_tok_s_median")
        if on:
            res["speedup_cache_on_vs_off"] = round(on / r["output_tok_s"], 2)
    else:
        res["cache_off"] = {"skipped": f"{b.left():.0f}s left"}
    res["fallbacks"] = list(be.fallbacks)
    b.free(be)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget", type=float, default=540.0)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--host-profile", action="store_true",
                    help="cascade on: host parts per step, GC on and off (no A/B)")
    ap.add_argument("--max-seqs", type=int, default=512, help="the engine's max_num_seqs")
    ap.add_argument("--skip-off", action="store_true", help="no prefix-cache-off run (~100 s)")
    args = ap.parse_args()
    # LOCALSERVE_CASCADE as the backend's default ("auto": cascade graphs only) unless set
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    b = Bench(args)
    b.results["command"] = "cascade_bench: " + b.results["command"]
    b.section("env", 5, b.env)
    b.section("conformance", 30, b.conformance)
    b.section("d", 200, show_d, b)
    if not args.cpu:
        b.section("caches", 5, b.save_caches)
    b.results["total_s"] = round(time.monotonic() - b.t0, 1)
    b.save()
    b.log("done")


if __name__ == "__main__":
    main()
