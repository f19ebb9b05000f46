"""Issue 4 on the GPU machine in one call: conformance, then the benchmarks of Show a-f.

    python3 benchmarks/scripts/gpu_bench.py --out $OUT --budget 560            # on the device
    python3 benchmarks/scripts/gpu_bench.py --out /tmp/x --cpu                   # dry run here, tiny models

Each section checks the time left against its estimate and is skipped (and said so) when it
would not fit; results go to OUT/gpu_bench.json after every section, so a run killed at its
limit still reports what it did. Performance does not depend on weight values: the models are
`random:` presets in bf16; outputs have fixed lengths (EOS ignored), seeds are fixed, every
timing comes after a warm-up. `--cpu` runs the same code on tiny presets on the CPU (Triton's
interpreter) to check the script, not to measure.
"""


from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_harness import Bench  # noqa: E402  (importing it maps localserve.backends on the device)
from gpu_show_e import IdleShow  # noqa: E402
from gpu_timing import kernel_table  # noqa: E402


class Show(IdleShow, Bench):
    """Show a-f of issue 4 and the profile, on the harness."""

    def llama(self, weight_format: str = "auto", parts: tuple[str, ...] = ("a", "b", "d", "f"),
              max_seqs: int = 512) -> dict:
        """a, b (ours), d, f on one llama-3.1-8b backend; then HF transformers on b's shape.
        `weight_format="fp8"`: the same with FP8 weights (--fp8: a and b)."""
        res = {}
        model = self.models["llama"]
        max_seqs = 8 if self.cpu else max_seqs
        max_tokens = 256 if self.cpu else 8192
        be, cfg, load_s = self.backend(model, max_seqs, max_tokens, weight_format=weight_format)
        eng, kv_s = self.engine(be, cfg, max_seqs, max_tokens)
        res["load"] = {"weights_s": round(load_s, 1), "kv_and_graphs_s": round(kv_s, 1),
                       **be.describe()}
        self.log("loaded", res["load"])
        # partial results saved as they come, under the section's own name
        key = "llama" if weight_format == "auto" else f"llama_{weight_format}"
        self.results["sections"][f"{key}_load"] = res["load"]
        self.save()
        for part, fn, est in (("a_bs1_decode", self.show_a, 20), ("b_offline", self.show_b, 60),
                              ("d_shared_prefix", self.show_d, 90), ("f_online", self.show_f, 60)):
            if part[0] not in parts:
                continue
            if self.left() < est + 10:
                res[part] = {"skipped": f"{self.left():.0f}s left"}
                continue
            self.log(f"== {part}")
            try:
                res[part] = fn(be, cfg, eng)
            except Exception as exc:
                traceback.print_exc()
                res[part] = {"error": f"{type(exc).__name__}: {exc}"}
            self.log(f"-- {part}: {json.dumps(res[part], default=str)[:1200]}")
            self.results["sections"][key] = res
            self.save()
        self.free(be)
        eng = be = None
        self.free()
        return res

    def show_a(self, be, cfg, eng) -> dict:
        """bs=1 decode, 128 -> 512 tokens, through the engine; plus the graph replay alone."""
        n_in, n_out = (16, 24) if self.cpu else (128, 512)
        p = self.rand_prompts(cfg.vocab_size, [n_in], 1)[0]
        self.stream(eng, p, 32)  # warm-up
        runs = []
        for i in range(3):
            eng.reset_prefix_cache()
            r, idle = self.idle_share(be, lambda: self.stream(eng, p, n_out))
            r["gpu_idle_share"] = round(idle, 4)
            runs.append(r)
        res = {"runs": runs, "decode_tok_s_median": float(np.median([r["decode_tok_s"] for r in runs])),
               "target_tok_s": 170}
        self.results["sections"]["a_partial"] = res
        self.save()
        if not self.cpu and be.graphs is not None:
            try:
                res["graph_replay"] = self.replay_timing(be, 1, n_in + n_out // 2, unfused=True)
                # decode throughput vs batch at context 640 (GPU.md's plain-PyTorch points)
                res["replay_sweep"] = [self.replay_timing(be, bs, 640)
                                       for bs in (1, 8, 64, 256, 512)
                                       if bs <= be.graphs.max_batch]
            except Exception as exc:
                traceback.print_exc()
                res["graph_replay_error"] = f"{type(exc).__name__}: {exc}"
        return res

    def profile(self) -> dict:
        """Where the time goes (run 3): host parts of a step at bs 1 and in b's workload,
        FlashInfer decode with and without tensor cores, a kernel breakdown of the bs1 step."""
        import torch

        res = {}
        model = self.models["llama"]
        be, cfg, _ = self.backend(model, 512, 8192)
        eng, _ = self.engine(be, cfg, 512, 8192)
        p = self.rand_prompts(cfg.vocab_size, [128], 1)[0]
        self.stream(eng, p, 32)
        eng.reset_prefix_cache()
        r, parts = self.host_breakdown(eng, lambda: self.stream(eng, p, 256))
        res["bs1_stream"] = {**r, "host_ms_per_step": parts}
        self.log("bs1", res["bs1_stream"])
        n = 1000
        ins, outs = self.sharegpt_like(n)
        prompts = self.rand_prompts(cfg.vocab_size, ins, 0)
        eng.reset_prefix_cache()
        r, parts = self.host_breakdown(eng, lambda: self.run_batch(eng, prompts, outs))
        res["b_offline"] = {**r, "host_ms_per_step": parts}
        self.log("b", res["b_offline"])
        self.results["sections"]["profile_partial"] = res
        self.save()
        with torch.inference_mode():
            res["kernels_bs1"] = self.kernel_breakdown(be)
        self.log("kernels", res["kernels_bs1"])
        att = be.model.attention
        if getattr(att, "name", "") == "flashinfer":
            from localserve.backends.cuda.graphs import DecodeGraphs

            ab = []
            for bs in (1, 64, 512):
                row = {"bs": bs, "tensor_cores": att.tensor_cores,
                       "ms": self.replay_timing(be, bs, 640)["fused_ms"]}
                att.tensor_cores = not att.tensor_cores
                try:
                    with torch.inference_mode():
                        g = DecodeGraphs(be.model, att, be.rope, be.kv, (bs,), be.block_size,
                                         be.graphs.max_blocks, be.num_blocks, be.device)
                        saved, be.graphs = be.graphs, g
                        try:
                            row["other_ms"] = self.replay_timing(be, bs, 640)["fused_ms"]
                        finally:
                            be.graphs = saved
                        del g
                except Exception as exc:
                    traceback.print_exc()
                    row["other_error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    att.tensor_cores = not att.tensor_cores
                ab.append(row)
                self.log("tc", row)
            res["decode_tensor_cores_ab"] = ab
        self.free(be)
        eng = be = None
        self.free()
        return res

    def kernel_breakdown(self, be) -> dict:
        """Device time per kernel class in 20 replays of the bs1 decode graph (torch profiler)."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        self.replay_timing(be, 1, 640)  # leaves bucket 1 filled with a ctx-640 batch
        graph = be.graphs.graphs[1][0]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
        table = kernel_table(prof, 20)
        return {"ms_per_step": table["ms"], "kernels_per_step": table["count"],
                "top": table["top"]}

    def show_b(self, be, cfg, eng) -> dict:
        """Through an engine with the backend's recommended batch shape (batch_shape.py: 1,024
        sequences x 8,192 tokens on the H100), over the same KV pages."""
        n = max(8, int(1000 * self.scale))
        ins, outs = self.sharegpt_like(n)
        prompts = self.rand_prompts(cfg.vocab_size, ins, 0)
        shape = be.recommended_batch_shape()
        if not self.cpu:
            eng, _ = self.engine(be, cfg, shape.max_num_seqs, shape.max_num_batched_tokens,
                                 num_blocks=be.num_blocks)
        eng.reset_prefix_cache()
        self.run_batch(eng, prompts[:16], np.minimum(outs[:16], 8))  # warm-up
        eng.reset_prefix_cache()
        r, idle = self.idle_share(be, lambda: self.run_batch(eng, prompts, outs))
        r["gpu_idle_share"] = round(idle, 4)
        r["target_output_tok_s"] = 17000
        r["batch_shape"] = [eng.cfg.max_num_seqs, eng.cfg.max_num_batched_tokens]
        eng.reset_prefix_cache()
        self.results["b_shape"] = {"ins_mean": float(ins.mean()), "outs_mean": float(outs.mean())}
        return r

    def show_f(self, be, cfg, eng) -> dict:
        """Poisson arrivals with b's lengths: TTFT and inter-token latency percentiles."""
        out = {}
        n = max(6, int(64 * self.scale))
        for rate in (4, 8, 16):
            if self.left() < n / rate + 25:
                out[str(rate)] = {"skipped": f"{self.left():.0f}s left"}
                continue
            eng.reset_prefix_cache()
            ins, outs = self.sharegpt_like(n, seed=rate)
            prompts = self.rand_prompts(cfg.vocab_size, ins, rate)
            rng = np.random.default_rng(100 + rate)
            arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
            out[str(rate)] = self.online(eng, prompts, outs, arrivals)
        return out

    def online(self, eng, prompts, outs, arrivals) -> dict:
        start = time.perf_counter()
        nxt = 0
        sub: dict[str, float] = {}
        tok_times: dict[str, list[float]] = {}
        while nxt < len(prompts) or eng.has_unfinished():
            now = time.perf_counter() - start
            while nxt < len(prompts) and arrivals[nxt] <= now:
                rid = eng.add_request(prompts[nxt], self.params(outs[nxt]))
                sub[rid] = start + arrivals[nxt]
                tok_times[rid] = []
                nxt += 1
            if not eng.has_unfinished():
                time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - start)))
                continue
            deltas = eng.step()
            t = time.perf_counter()
            for d in deltas:
                tok_times[d.request_id] += [t] * len(d.token_ids)
        wall = time.perf_counter() - start
        ttft = [tok_times[r][0] - sub[r] for r in sub]
        itl = [b - a for r in sub for a, b in zip(tok_times[r], tok_times[r][1:])]

        def pct(xs, q):
            return round(float(np.percentile(xs, q)) * 1e3, 2)

        return {"requests": len(prompts), "wall_s": round(wall, 2),
                "output_tok_s": round(sum(len(v) for v in tok_times.values()) / wall, 1),
                "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
                "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}

    def show_d(self, be, cfg, eng) -> dict:
        """64 groups x 16 prompts: 2,048-token shared prefix + 128-token question, 256 out."""
        groups, per, sys_len, q_len, n_out = ((2, 4, 64, 8, 8) if self.cpu else (64, 16, 2048, 128, 256))
        # the cache-off run costs ~9x the prefill: fewer groups when time is short
        if not self.cpu and self.left() < 330:
            groups = 16  # the same ideal hit rate (it is per group), a quarter of the work
        rng = np.random.default_rng(3)
        prompts = []
        for g in range(groups):
            system = rng.integers(10, cfg.vocab_size - 10, sys_len).tolist()
            prompts += [system + rng.integers(10, cfg.vocab_size - 10, q_len).tolist()
                        for _ in range(per)]
        order = rng.permutation(len(prompts))  # groups interleaved, as requests would arrive
        prompts = [prompts[i] for i in order]
        outs = np.full(len(prompts), n_out)
        ideal = 1 - (groups * (sys_len + q_len) + (len(prompts) - groups) * q_len) / (
            len(prompts) * (sys_len + q_len))
        eng.reset_prefix_cache()
        on = self.run_batch(eng, prompts, outs)
        on["hit_rate"] = round(on["prefix_hit_tokens"] / max(1, on["prefix_query_tokens"]), 4)
        eng.reset_prefix_cache()
        off_eng, _ = self.engine(be, cfg, eng.cfg.max_num_seqs, eng.cfg.max_num_batched_tokens,
                                 prefix_cache=False, num_blocks=be.num_blocks)
        off = self.run_batch(off_eng, prompts, outs)
        return {"groups": groups, "per_group": per, "ideal_hit_rate": round(ideal, 4),
                "cache_on": on, "cache_off": off,
                "speedup_output_tok_s": round(on["output_tok_s"] / off["output_tok_s"], 2),
                "target": "hit >= 0.87, speedup >= 4"}

    def hf_peer(self) -> dict:
        """HF transformers generate() on b's shape: the first 256 of b's 1,000 prompts in one
        left-padded batch, greedy, every row generating the batch's longest output."""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from localserve.models.presets import preset_config

        mc = preset_config(self.models["llama"])
        n = 8 if self.cpu else 256
        ins, outs = self.sharegpt_like(max(8, int(1000 * self.scale)))
        ins, outs = ins[:n], outs[:n]
        prompts = self.rand_prompts(mc.vocab_size, ins, 0)
        dev = "cpu" if self.cpu else "cuda"
        dtype = torch.float32 if self.cpu else torch.bfloat16
        hc = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
                         intermediate_size=mc.intermediate_size, num_hidden_layers=mc.num_layers,
                         num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
                         head_dim=mc.head_dim, max_position_embeddings=4096, rms_norm_eps=1e-5)
        t = time.monotonic()
        with torch.device(dev):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = LlamaForCausalLM(hc).eval()
            finally:
                torch.set_default_dtype(prev)
        build_s = time.monotonic() - t
        width = int(ins.max())
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        m = int(outs.max())
        max_time = max(10.0, min(90.0, self.left() - 30))
        with torch.inference_mode():
            model.generate(input_ids=ids[:4, -16:], attention_mask=mask[:4, -16:],
                           max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            self.sync()
            t = time.perf_counter()
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=m,
                                 min_new_tokens=m, do_sample=False, pad_token_id=0,
                                 max_time=max_time)
            self.sync()
            wall = time.perf_counter() - t
        steps = gen.shape[1] - width
        useful = int(np.minimum(outs, steps).sum())
        del model, gen
        self.free()
        return {"engine": "transformers generate (static batch, left-padded)", "batch": n,
                "max_new_tokens": m, "steps_done": steps, "stopped_by_max_time": steps < m,
                "build_s": round(build_s, 1), "wall_s": round(wall, 2),
                "useful_output_tok_s": round(useful / wall, 1),
                "generated_tok_s": round(n * steps / wall, 1)}

    def show_c(self) -> dict:
        """nano-vllm's recipe: qwen3-0.6b, 256 sequences, input and output uniform 100-1024."""
        n = 8 if self.cpu else 256
        rng = np.random.default_rng(0)
        hi = 40 if self.cpu else 1025
        lo = 10 if self.cpu else 100
        ins, outs = rng.integers(lo, hi, n), rng.integers(lo, hi, n)
        be, cfg, _ = self.backend(self.models["qwen"], n, 16384 if not self.cpu else 256)
        eng, _ = self.engine(be, cfg, n, 16384 if not self.cpu else 256)
        prompts = self.rand_prompts(cfg.vocab_size, ins, 0)
        self.run_batch(eng, prompts[:8], [4] * 8)
        eng.reset_prefix_cache()
        r, idle = self.idle_share(be, lambda: self.run_batch(eng, prompts, outs))
        r["gpu_idle_share"] = round(idle, 4)
        r["attention"] = be.attention_name
        self.free(be)
        eng = be = None
        self.free()
        return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget", type=float, default=560.0, help="seconds this run may take")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU with tiny presets")
    ap.add_argument("--only", default="", help="comma-separated sections")
    ap.add_argument("--parts", default="a,b,d,f", help="the llama section's Show parts")
    ap.add_argument("--smoke", action="store_true", help="conformance, a, e; save JIT caches")
    ap.add_argument("--profile", action="store_true",
                    help="conformance, then where the time goes (host parts, kernels, TC A/B)")
    ap.add_argument("--fp8", action="store_true",
                    help="a and b with FP8 weights (weight_format fp8), then with bf16")
    ap.add_argument("--chart", nargs=2, metavar=("JSON", "PNG"),
                    help="draw the chart of a result JSON (needs matplotlib) and exit")
    args = ap.parse_args()
    if args.chart:
        from gpu_chart import chart  # benchmarks/scripts/ is on sys.path when run as a script

        chart(*args.chart)
        return
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    b = Show(args)
    b.section("env", 5, b.env)
    b.section("conformance", 30, b.conformance)
    if not args.cpu:
        b.section("caches", 5, b.save_caches)
    if args.fp8:
        b.section("fp8_check", 10, b.fp8_check)
        # with LOCALSERVE_MAX_GRAPH_BATCH past 512 the backend is sized for b's 1,024 rows
        seqs = 1024 if int(os.environ.get("LOCALSERVE_MAX_GRAPH_BATCH", "512")) > 512 else 512
        b.section("llama_fp8", 90, b.llama, "fp8", ("a", "b"), seqs)
        b.section("llama", 90, b.llama, "auto", ("a", "b"), seqs)
    elif args.profile:
        b.section("profile", 90, b.profile)
        b.section("e_idle", 45, b.show_e_profiled)
    elif args.smoke:
        b.section("llama", 60, b.llama_smoke)
        b.section("e_idle", 40, b.show_e)
    else:
        b.section("llama", 120, b.llama, "auto", tuple(args.parts.split(",")))
        if "b" in args.parts.split(","):  # b again with FP8 weights (--weights fp8)
            b.section("llama_fp8", 45, b.llama, "fp8", ("b",))
        b.section("hf_peer", 70, b.hf_peer)
        b.section("e_idle", 45, b.show_e)
        b.section("c_nanovllm", 45, b.show_c)
    if not args.cpu:
        b.section("caches", 5, b.save_caches)
    b.results["total_s"] = round(time.monotonic() - b.t0, 1)
    b.save()
    b.log("done", json.dumps(b.results["sections"].get("llama", {}), default=str)[:3000])


def _llama_smoke(self) -> dict:
    """Smoke: load the 8B shape with a small batch limit, bs=1 decode (a) and replay timing."""
    model = self.models["llama"]
    be, cfg, load_s = self.backend(model, 64, 2048)
    eng, kv_s = self.engine(be, cfg, 64, 2048)
    res = {"load": {"weights_s": round(load_s, 1), "kv_and_graphs_s": round(kv_s, 1),
                    **be.describe()}}
    try:
        res["a_bs1_decode"] = self.show_a(be, cfg, eng)
    except Exception as exc:
        traceback.print_exc()
        res["a_bs1_decode"] = {"error": f"{type(exc).__name__}: {exc}"}
    self.free(be)
    return res


Show.llama_smoke = _llama_smoke

if __name__ == "__main__":
    main()
