"""Issue 4 on the GPU machine in one call: conformance, then the benchmarks of Show a-f.

    python3 scripts/gpu_bench.py --out $OUT --budget 560            # on the device
    python3 scripts/gpu_bench.py --out /tmp/x --cpu                   # dry run here, tiny models

Each section checks the time left against its estimate and is skipped (and said so) when it
would not fit; results go to OUT/gpu_bench.json after every section, so a run killed at its
limit still reports what it did. Performance does not depend on weight values: the models are
`random:` presets in bf16; outputs have fixed lengths (EOS ignored), seeds are fixed, every
timing comes after a warm-up. `--cpu` runs the same code on tiny presets on the CPU (Triton's
interpreter) to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _map_backends() -> None:
    """Without `pip install -e .` (the device machine), top-level backends/ is imported as
    localserve.backends the way pyproject's package-dir maps it."""
    try:
        import localserve.backends  # noqa: F401  (pyflakes: used for its side effect)
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "localserve.backends", ROOT / "backends" / "__init__.py",
            submodule_search_locations=[str(ROOT / "backends")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["localserve.backends"] = mod
        spec.loader.exec_module(mod)


_map_backends()

FULL = {"llama": "llama-3.1-8b", "gemma": "gemma-3-270m", "qwen": "qwen3-0.6b"}
TINY = {"llama": "tiny-llama", "gemma": "tiny-gemma3", "qwen": "tiny-qwen3"}


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.cpu = args.cpu
        self.models = TINY if self.cpu else FULL
        self.t0 = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "command": " ".join(sys.argv), "sections": {}}
        self.scale = 0.02 if self.cpu else 1.0  # request counts in --cpu dry runs

    # -- bookkeeping ------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def log(self, *parts) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s]", *parts, flush=True)

    def save(self) -> None:
        (self.out / "gpu_bench.json").write_text(json.dumps(self.results, indent=1, default=str))

    def section(self, name: str, estimate: float, fn, *a) -> None:
        if self.args.only and name not in self.args.only.split(","):
            return
        if self.left() < estimate:
            self.log(f"SKIP {name}: needs ~{estimate:.0f}s, {self.left():.0f}s left")
            self.results["sections"][name] = {"skipped": f"needs ~{estimate:.0f}s, "
                                                         f"{self.left():.0f}s left"}
            self.save()
            return
        self.log(f"== {name}")
        start = time.monotonic()
        try:
            res = fn(*a)
        except Exception as exc:
            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"}
        res = dict(res or {})
        res["section_seconds"] = round(time.monotonic() - start, 1)
        self.results["sections"][name] = res
        self.log(f"-- {name}: {json.dumps(res, default=str)[:1500]}")
        self.save()

    # -- building blocks --------------------------------------------------------------
    @property
    def device(self):
        return "cpu" if self.cpu else None

    def backend(self, model: str, max_num_seqs: int, max_tokens: int, compile: str = "auto"):
        from localserve.backends.cuda import CUDABackend
        from localserve.engine.backend import BackendConfig
        from localserve.models.loader import load_weights

        w = load_weights(f"random:{model}")
        be = CUDABackend(device=self.device)
        t = time.monotonic()
        be.load(w, BackendConfig(dtype="float32" if self.cpu else "bfloat16", compile=compile,
                                 memory_utilization=0.9, max_num_batched_tokens=max_tokens,
                                 max_num_seqs=max_num_seqs))
        return be, w.config, time.monotonic() - t

    def engine(self, be, cfg, max_num_seqs: int, max_tokens: int, prefix_cache: bool = True,
               num_blocks: int | None = None):
        from localserve.engine.llm_engine import EngineConfig, LLMEngine

        if self.cpu:
            num_blocks = num_blocks or 2048
        t = time.monotonic()
        eng = LLMEngine(be, cfg, None, EngineConfig(
            block_size=16, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_tokens, enable_prefix_cache=prefix_cache))
        if os.environ.get("LOCALSERVE_GC") != "default":  # as `localserve up` after load
            from localserve.runtime.gc_tuning import tune_gc

            self.results.setdefault("gc", tune_gc())
        return eng, time.monotonic() - t

    @staticmethod
    def params(n: int):
        from localserve.engine.sampling_params import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True, seed=0)

    def sync(self) -> None:
        if not self.cpu:
            import torch

            torch.cuda.synchronize()

    def run_batch(self, eng, prompts, out_lens) -> dict:
        """All submitted at once; output tokens / wall from submission to the last token."""
        before = eng.stats()
        self.sync()
        t = time.perf_counter()
        for p, n in zip(prompts, out_lens):
            eng.add_request(p, self.params(n))
        steps = 0
        got = 0
        while eng.has_unfinished():
            got += sum(len(d.token_ids) for d in eng.step())
            steps += 1
        wall = time.perf_counter() - t
        assert got == int(sum(out_lens)), (got, int(sum(out_lens)))
        st = eng.stats()
        return {"requests": len(prompts), "output_tokens": got,
                "input_tokens": int(sum(len(p) for p in prompts)), "wall_s": round(wall, 3),
                "output_tok_s": round(got / wall, 1),
                "total_tok_s": round((got + sum(len(p) for p in prompts)) / wall, 1),
                "steps": steps,
                "prefix_hit_tokens": st.prefix_hit_tokens - before.prefix_hit_tokens,
                "prefix_query_tokens": st.prefix_query_tokens - before.prefix_query_tokens,
                "preemptions": st.num_preemptions - before.num_preemptions}

    def stream(self, eng, prompt, n) -> dict:
        """One request alone: decode rate = (n - 1) / (last - first token time)."""
        self.sync()
        t = time.perf_counter()
        eng.add_request(prompt, self.params(n))
        times = []
        while eng.has_unfinished():
            for d in eng.step():
                times += [time.perf_counter()] * len(d.token_ids)
        assert len(times) == n
        return {"ttft_ms": round((times[0] - t) * 1e3, 2),
                "decode_tok_s": round((n - 1) / (times[-1] - times[0]), 2)}

    def host_breakdown(self, eng, fn) -> tuple[dict, dict]:
        """Runs fn() with the step's parts timed on the host: mean ms per step of
        scheduler.schedule, backend.execute (prepare, replay launch, the wait for the ids),
        scheduler.update and the engine's deltas."""
        parts = {"schedule": 0.0, "execute": 0.0, "update": 0.0, "deltas": 0.0}  # ms per step
        calls = {"n": 0}
        originals = []

        def timed(obj, attr, key):
            f = getattr(obj, attr)
            originals.append((obj, attr))

            def g(*a, **k):
                t = time.perf_counter()
                try:
                    return f(*a, **k)
                finally:
                    parts[key] += time.perf_counter() - t
                    if key == "schedule":
                        calls["n"] += 1
            setattr(obj, attr, g)

        timed(eng.scheduler, "schedule", "schedule")
        timed(eng.backend, "execute", "execute")
        if callable(getattr(eng.backend, "execute_async", None)):  # overlap: the submit
            parts["execute_async"] = 0.0
            timed(eng.backend, "execute_async", "execute_async")
        graphs = getattr(eng.backend, "graphs", None)
        if graphs is not None:  # inside execute: padded inputs + FlashInfer's plan
            parts["graph_prepare"] = 0.0
            timed(graphs, "prepare", "graph_prepare")
        timed(eng.scheduler, "update", "update")
        timed(eng, "_deltas", "deltas")
        try:
            res = fn()
        finally:
            for obj, attr in originals:
                delattr(obj, attr)  # the instance attribute hid the class's method
        n = max(1, calls["n"])
        return res, {k: round(v / n * 1e3, 3) for k, v in parts.items()} | {"steps": n}

    def idle_share(self, be, fn) -> tuple[dict, float]:
        """Runs fn() with step events on: 1 - (device time inside execute's events) / wall."""
        if self.cpu:
            return fn(), float("nan")
        import torch

        be.step_events = []
        torch.cuda.synchronize()
        t = time.perf_counter()
        res = fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        busy = sum(a.elapsed_time(b) for a, b in be.step_events) / 1e3
        be.step_events = None
        return res, 1.0 - busy / wall

    def rand_prompts(self, vocab: int, lens, seed: int) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        return [rng.integers(10, vocab - 10, int(n)).tolist() for n in lens]

    def free(self, *objs) -> None:
        for o in objs:
            close = getattr(o, "close", None)
            if close is not None:
                close()
        gc.collect()
        if not self.cpu:
            import torch

            torch.cuda.empty_cache()

    # -- sections ---------------------------------------------------------------------
    def env(self) -> dict:
        import torch

        info = {"python": sys.version.split()[0], "torch": torch.__version__,
                "cuda": torch.version.cuda}
        try:
            import triton

            info["triton"] = triton.__version__
        except Exception as exc:
            info["triton"] = f"missing: {exc}"
        try:
            import flashinfer

            info["flashinfer"] = flashinfer.__version__
        except Exception as exc:
            info["flashinfer"] = f"missing: {exc}"
        from localserve.backends.cuda import CUDABackend

        info["probe"] = [str(d) for d in CUDABackend.probe()]
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                        sms=p.multi_processor_count)
            n = 1 << 28  # 1 GiB of fp32: device-to-device copy bandwidth (read + write)
            a = torch.empty(n, device="cuda")
            b = torch.empty_like(a)
            b.copy_(a)
            torch.cuda.synchronize()
            reps = 20
            t = time.perf_counter()
            for _ in range(reps):
                b.copy_(a)
            torch.cuda.synchronize()
            info["d2d_copy_tb_s"] = round(2 * 4 * n * reps / (time.perf_counter() - t) / 1e12, 3)
            del a, b
            torch.cuda.empty_cache()
        self.results["env"] = info
        return info

    def conformance(self) -> dict:
        from localserve.backends.cuda import CUDABackend
        from localserve.backends.cuda.conformance import run_conformance

        out = {}
        runs = [  # (name, attention, dtype, models, rtol)
            ("fp32 triton", "triton", "float32", ("tiny-llama", "tiny-gemma3", "tiny-qwen3"), None),
            ("bf16 flashinfer", "flashinfer", "bfloat16",
             ("tiny-llama@128/1", "tiny-gemma3@256/1", "tiny-qwen3@128/2"), 3e-2),
            ("bf16 triton", "triton", "bfloat16", ("tiny-llama@128/1", "tiny-gemma3@256/1"), 3e-2),
            ("fp32 torch", "torch", "float32", ("tiny-llama",), None),
        ]
        if self.cpu:
            runs = [("fp32 triton", "triton", "float32", ("tiny-gemma3",), None)]
        before = os.environ.get("LOCALSERVE_ATTENTION")
        for name, attn, dtype, models, rtol in runs:
            os.environ["LOCALSERVE_ATTENTION"] = attn
            made = []

            def make():
                made.append(CUDABackend(device=self.device))
                return made[-1]

            try:
                kw = dict(max_new=6, lengths=(6, 19, 33)) if self.cpu else {}
                rep = run_conformance(make, models=models, dtype=dtype, logits_rtol=rtol, **kw)
                used = sorted({b.attention_name for b in made})
                fused = sorted({bool(b.model and b.model.fused) for b in made})
                out[name] = {"ok": rep.ok, "attention": used, "fused": fused,
                             "fallbacks": sorted({f for b in made for f in b.fallbacks}),
                             "checks": rep.lines()}
                self.log(name, "PASS" if rep.ok else "FAIL", used, "\n  " + "\n  ".join(rep.lines()))
            except Exception as exc:
                traceback.print_exc()
                out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            finally:
                os.environ.pop("LOCALSERVE_ATTENTION", None)
                if before is not None:
                    os.environ["LOCALSERVE_ATTENTION"] = before
                self.free(*made)
        out["ok"] = all(v.get("ok") for v in out.values() if isinstance(v, dict))
        return out

    def llama(self) -> dict:
        """a, b (ours), d, f on one llama-3.1-8b backend; then HF transformers on b's shape."""
        res = {}
        model = self.models["llama"]
        max_seqs = 8 if self.cpu else 512
        max_tokens = 256 if self.cpu else 8192
        be, cfg, load_s = self.backend(model, max_seqs, max_tokens)
        eng, kv_s = self.engine(be, cfg, max_seqs, max_tokens)
        res["load"] = {"weights_s": round(load_s, 1), "kv_and_graphs_s": round(kv_s, 1),
                       **be.describe()}
        self.log("loaded", res["load"])
        self.results["sections"]["llama_load"] = res["load"]
        self.save()
        for key, fn, est in (("a_bs1_decode", self.show_a, 20), ("b_offline", self.show_b, 60),
                             ("d_shared_prefix", self.show_d, 90), ("f_online", self.show_f, 60)):
            if self.left() < est + 10:
                res[key] = {"skipped": f"{self.left():.0f}s left"}
                continue
            self.log(f"== {key}")
            try:
                res[key] = fn(be, cfg, eng)
            except Exception as exc:
                traceback.print_exc()
                res[key] = {"error": f"{type(exc).__name__}: {exc}"}
            self.log(f"-- {key}: {json.dumps(res[key], default=str)[:1200]}")
            self.results["sections"]["llama"] = res
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

    def replay_timing(self, be, bs: int, ctx: int, unfused: bool = False) -> dict:
        """Median device time of the bs-bucket decode graph at context ctx (and of one captured
        without the fused kernels)."""
        import torch

        with torch.inference_mode():
            return self._replay_timing(be, bs, ctx, unfused)

    def _replay_timing(self, be, bs: int, ctx: int, unfused: bool) -> dict:
        import torch

        from localserve.backends.cuda.graphs import DecodeGraphs
        from localserve.engine.plan import Plan, SamplingRow

        nb = -(-(ctx + 1) // be.block_size)
        tables = np.arange(bs * nb, dtype=np.int32).reshape(bs, nb) % be.num_blocks
        pos = np.full(bs, ctx, dtype=np.int64)
        plan = Plan(seq_ids=list(range(bs)), input_ids=np.full(bs, 11, np.int64), positions=pos,
                    slot_mapping=tables[:, ctx // be.block_size].astype(np.int64) * be.block_size
                    + ctx % be.block_size,
                    query_start_loc=np.arange(bs + 1, dtype=np.int32),
                    seq_lens=np.full(bs, ctx + 1, np.int32), block_tables=tables,
                    sample_idx=np.arange(bs, dtype=np.int32),
                    sampling=[SamplingRow(params=self.params(1), seed=0, step=0)] * bs,
                    block_size=be.block_size)

        def timed(graphs) -> float:
            graphs.prepare(plan)
            for _ in range(3):
                graphs.replay(plan)
            times = []
            for _ in range(30):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graphs.replay(plan)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            return float(np.median(times))

        out = {"bs": bs, "context": ctx}
        ms = timed(be.graphs)
        out["fused_ms"] = round(ms, 4)
        out["fused_tok_s"] = round(bs * 1e3 / ms, 1)
        if unfused and be.model.fused:
            be.model.fused = False
            try:
                g = DecodeGraphs(be.model, be.model.attention, be.rope, be.kv, (bs,),
                                 be.block_size, be.graphs.max_blocks, be.num_blocks, be.device)
                ms2 = timed(g)
                out["unfused_ms"] = round(ms2, 4)
                out["unfused_tok_s"] = round(bs * 1e3 / ms2, 1)
                del g
            finally:
                be.model.fused = True
        return out

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
        classes: dict[str, float] = {}
        count: dict[str, int] = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if not t:
                continue
            name = ev.key.lower()
            cls = ("gemm" if any(k in name for k in ("gemm", "gemv", "cutlass", "sm90", "xmma",
                                                     "nvjet"))
                   else "attention" if any(k in name for k in ("flashinfer", "prefill", "decode",
                                                               "merge", "attention"))
                   else "fused triton" if name.startswith("_") and "kernel" in name
                   else "other")
            classes[cls] = classes.get(cls, 0.0) + t / 20 / 1e3
            count[cls] = count.get(cls, 0) + ev.count // 20
        top = sorted(((ev.key[:60], round((getattr(ev, "device_time_total", None) or 0) / 20 / 1e3, 4))
                      for ev in prof.key_averages()), key=lambda x: -x[1])[:12]
        return {"ms_per_step": {k: round(v, 4) for k, v in classes.items()},
                "kernels_per_step": count, "top": top}

    def sharegpt_like(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        ins = rng.integers(4, 401, n)
        outs = rng.integers(4, 359, n)
        return ins, outs

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

    def show_e(self) -> dict:
        """gemma-3-270m: device idle share at batch 1 and 64, CUDA graphs on and off."""
        out = {}
        model = self.models["gemma"]
        for compile in ("auto", "off"):
            be, cfg, _ = self.backend(model, 64, 2048, compile=compile)
            eng, _ = self.engine(be, cfg, 64, 2048)
            key = "graphs" if be.graphs is not None else "eager"
            n_out = 16 if self.cpu else 256
            p = self.rand_prompts(cfg.vocab_size, [128 if not self.cpu else 12] * 64, 5)
            self.stream(eng, p[0], 8)
            r1, i1 = self.idle_share(be, lambda: self.stream(eng, p[0], n_out))
            eng.reset_prefix_cache()
            self.run_batch(eng, p[:8], [4] * 8)
            eng.reset_prefix_cache()
            r64, i64 = self.idle_share(be, lambda: self.run_batch(eng, p, [n_out] * 64))
            out[key] = {"bs1_idle": round(i1, 4), "bs1_decode_tok_s": r1["decode_tok_s"],
                        "bs64_idle": round(i64, 4), "bs64_output_tok_s": r64["output_tok_s"],
                        "attention": be.attention_name, "fused": be.model.fused,
                        "overlap": eng.async_scheduling}
            if compile == "auto" and be.graphs is not None and not self.cpu:
                try:
                    out[key]["bs1_replay"] = self.replay_timing(be, 1, 128 + n_out // 2, True)
                    out[key]["bs64_replay"] = self.replay_timing(be, 64, 128 + n_out // 2, True)
                except Exception as exc:
                    traceback.print_exc()
                    out[key]["replay_error"] = f"{type(exc).__name__}: {exc}"
            self.log(key, out[key])
            self.free(be)
            eng = be = None
            self.free()
            if self.left() < 40:
                break
        out["target"] = "idle < 0.10"
        return out

    def show_e_profiled(self) -> dict:
        """e again (graphs on) with the host parts of each step timed."""
        out = {}
        be, cfg, _ = self.backend(self.models["gemma"], 64, 2048)
        eng, _ = self.engine(be, cfg, 64, 2048)
        n_out = 16 if self.cpu else 256
        p = self.rand_prompts(cfg.vocab_size, [128 if not self.cpu else 12] * 64, 5)
        self.stream(eng, p[0], 8)
        (r1, h1), i1 = self.idle_share(be, lambda: self.host_breakdown(
            eng, lambda: self.stream(eng, p[0], n_out)))
        eng.reset_prefix_cache()
        self.run_batch(eng, p[:8], [4] * 8)
        eng.reset_prefix_cache()
        (r64, h64), i64 = self.idle_share(be, lambda: self.host_breakdown(
            eng, lambda: self.run_batch(eng, p, [n_out] * 64)))
        out["graphs"] = {"bs1_idle": round(i1, 4), "bs1_decode_tok_s": r1["decode_tok_s"],
                         "bs1_host_ms_per_step": h1, "bs64_idle": round(i64, 4),
                         "bs64_output_tok_s": r64["output_tok_s"], "bs64_host_ms_per_step": h64}
        self.free(be)
        eng = be = None
        self.free()
        return out

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

    def save_caches(self) -> dict:
        """FlashInfer's JIT-built modules as an AOT tree (loaded without a rebuild next call)
        and Triton's cache, into OUT (the device machine keeps nothing)."""
        import subprocess

        out = {}
        try:
            from flashinfer.jit import env

            jit = Path(env.FLASHINFER_JIT_DIR)
            sos = sorted(p.relative_to(jit) for p in jit.glob("*/*.so"))
            if sos:
                subprocess.run(["tar", "czf", str(self.out / "fi_aot.tgz"), "-C", str(jit),
                                *map(str, sos)], check=True)
                out["flashinfer_modules"] = [str(s.parent) for s in sos]
                out["fi_aot_mb"] = round((self.out / "fi_aot.tgz").stat().st_size / 2**20, 1)
        except Exception as exc:
            out["flashinfer"] = f"{type(exc).__name__}: {exc}"
        tc = os.environ.get("TRITON_CACHE_DIR")
        if tc and Path(tc).is_dir():
            subprocess.run(["tar", "czf", str(self.out / "triton_cache.tgz"), "-C", tc, "."],
                           check=True)
            out["triton_cache_mb"] = round((self.out / "triton_cache.tgz").stat().st_size / 2**20, 1)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget", type=float, default=560.0, help="seconds this run may take")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU with tiny presets")
    ap.add_argument("--only", default="", help="comma-separated sections")
    ap.add_argument("--smoke", action="store_true", help="conformance, a, e; save JIT caches")
    ap.add_argument("--profile", action="store_true",
                    help="conformance, then where the time goes (host parts, kernels, TC A/B)")
    ap.add_argument("--chart", nargs=2, metavar=("JSON", "PNG"),
                    help="draw the chart of a result JSON (needs matplotlib) and exit")
    args = ap.parse_args()
    if args.chart:
        from gpu_chart import chart  # scripts/ is on sys.path when run as a script

        chart(*args.chart)
        return
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    b = Bench(args)
    b.section("env", 5, b.env)
    b.section("conformance", 30, b.conformance)
    if not args.cpu:
        b.section("caches", 5, b.save_caches)
    if args.profile:
        b.section("profile", 90, b.profile)
        b.section("e_idle", 45, b.show_e_profiled)
    elif args.smoke:
        b.section("llama", 60, b.llama_smoke)
        b.section("e_idle", 40, b.show_e)
    else:
        b.section("llama", 120, b.llama)
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


Bench.llama_smoke = _llama_smoke

if __name__ == "__main__":
    main()
