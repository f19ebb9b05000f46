"""The GPU scripts' harness: `Bench` keeps the time budget and the results JSON, builds
backends and engines on `random:` presets, and has the measuring blocks every script shares
(batch runs, streams, host breakdown, GPU idle share, graph replay timing), the environment
report, conformance and the saved JIT caches. benchmarks/scripts/gpu_bench.py (Show a-f),
overlap_bench.py and cascade_bench.py build on it.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
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

from gpu_timing import time_calls  # noqa: E402

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

    def backend(self, model: str, max_num_seqs: int, max_tokens: int, compile: str = "auto",
                weight_format: str = "auto"):
        from localserve.backends.cuda import CUDABackend
        from localserve.engine.backend import BackendConfig
        from localserve.models.loader import load_weights

        w = load_weights(f"random:{model}")
        be = CUDABackend(device=self.device)
        t = time.monotonic()
        # LOCALSERVE_BENCH_KV_DTYPE=fp8: the KV pages in e4m3 for every llama/qwen/gemma run
        kv_dtype = os.environ.get("LOCALSERVE_BENCH_KV_DTYPE", "auto")
        be.load(w, BackendConfig(dtype="float32" if self.cpu else "bfloat16", compile=compile,
                                 weight_format=weight_format, kv_dtype=kv_dtype,
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

    def run_batch(self, eng, prompts, out_lens, step_seconds: list | None = None) -> dict:
        """All submitted at once; output tokens / wall from submission to the last token.
        `step_seconds` (a list) gets each engine step's wall time."""
        before = eng.stats()
        self.sync()
        t = time.perf_counter()
        for p, n in zip(prompts, out_lens):
            eng.add_request(p, self.params(n))
        steps = 0
        got = 0
        while eng.has_unfinished():
            s = time.perf_counter()
            got += sum(len(d.token_ids) for d in eng.step())
            if step_seconds is not None:
                step_seconds.append(time.perf_counter() - s)
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
        targets = [(eng.scheduler, "schedule", "schedule"), (eng.backend, "execute", "execute")]
        if callable(getattr(eng.backend, "execute_async", None)):  # overlap: the submit
            targets.append((eng.backend, "execute_async", "execute_async"))
        graphs = getattr(eng.backend, "graphs", None)
        if graphs is not None:  # inside execute: padded inputs + FlashInfer's plan
            targets.append((graphs, "prepare", "graph_prepare"))
        targets += [(eng.scheduler, "update", "update"), (eng, "_deltas", "deltas")]
        parts: dict[str, float] = {}
        calls: dict[str, int] = {}
        with time_calls(targets, parts, calls):
            res = fn()
        n = max(1, calls.get("schedule", 0))
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
        ev = be.step_events
        busy = sum(a.elapsed_time(b) for a, b in ev) / 1e3
        be.step_events = None
        if ev and isinstance(res, dict):
            # the GPU's own timeline: idle between its first step's start and last step's end
            # (the wall share above also counts the host's work before the first step and
            # after the last), and the longest gaps between steps
            span = ev[0][0].elapsed_time(ev[-1][1]) / 1e3
            in_order = [ev[i][1].elapsed_time(ev[i + 1][0]) for i in range(len(ev) - 1)]
            gaps = sorted((g, i) for i, g in enumerate(in_order))
            res["gpu_idle_between_steps"] = round(1.0 - busy / span, 4) if span > 0 else None
            res["lead_in_ms"] = round((wall - span) * 1e3, 2)
            res["longest_gaps_ms"] = [(round(g, 2), i) for g, i in gaps[-3:][::-1]]
            # the ramp (admissions, prefill chunks) apart from the steady steps after it
            res["first_gaps_ms"] = [round(g, 2) for g in in_order[:8]]
            if len(ev) > 10:
                tail = ev[8][0].elapsed_time(ev[-1][1])
                busy_tail = sum(a.elapsed_time(b) for a, b in ev[8:])
                res["idle_after_step_8"] = round(1.0 - busy_tail / tail, 4) if tail > 0 else None
        return res, 1.0 - busy / wall

    def fp8_check(self) -> dict:
        """FP8 weights (backends/cuda/fp8.py) on the device: the Triton row quantizer vs the
        torch route (the same e4m3 codes expected), and an Fp8Linear of llama's gate|up shape
        against the dense bf16 product."""
        import torch

        from localserve.backends.cuda import fp8

        if self.cpu or not fp8.fp8_supported(torch.device("cuda")):
            return {"skipped": "needs an FP8 GPU"}
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(512, 4096, generator=g, device="cuda").mul_(
            torch.logspace(-2, 2, 512, device="cuda")[:, None]).bfloat16()
        q, sc = fp8._quantize_rows_triton(x)
        amax = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12)
        s2 = amax / fp8.FP8_MAX
        q2 = (x.float() / s2).to(fp8.FP8)
        w = torch.randn(28672, 4096, generator=g, device="cuda").mul_(0.02).bfloat16()
        y = fp8.Fp8Linear(w)(x)
        dense = x.float() @ w.float().t()
        rel = ((y.float() - dense).norm(dim=1) / dense.norm(dim=1)).max()
        # the quantizer fused into the norm and act*mul kernels: the separate one's codes
        from localserve.backends.triton_kernels import fused as K

        gu = torch.randn(512, 2 * 14336, generator=g, device="cuda").bfloat16()
        nw = torch.randn(4096, generator=g, device="cuda").bfloat16()
        fused_diff = 0
        for ref, got in ((K.rms_norm(x, nw, 1e-5), K.rms_norm(x, nw, 1e-5, quant=True)),
                         (K.act_mul(gu, "silu"), K.act_mul(gu, "silu", quant=True))):
            rq, rs = fp8._quantize_rows_triton(ref)
            fused_diff += int((rq.view(torch.uint8) != got[0].view(torch.uint8)).sum())
            fused_diff += int((rs != got[1]).sum())
        return {"quantizer_codes_differing": int((q.view(torch.uint8) != q2.view(torch.uint8)).sum()),
                "quantizer_scale_max_rel_diff": float(((sc - s2).abs() / s2).max()),
                "fused_quantizer_values_differing": fused_diff,
                "linear_max_row_rel_err_vs_bf16": round(float(rel), 4)}

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
        # e4m3 KV pages (--kv-dtype fp8): 3 mantissa bits on every K and V, a looser tolerance
        # (the CPU reference with K/V rounded to e4m3 is itself 6% / 13% off fp32 on these two;
        # tiny random llama, without qk-norm, 38%: its logits are not compared)
        fp8_kv = [("bf16 flashinfer fp8-kv", "flashinfer", "bfloat16",
                   ("tiny-gemma3@256/1", "tiny-qwen3@128/2"), 0.2),
                  ("bf16 flashinfer fp8-kv llama", "flashinfer", "bfloat16",
                   ("tiny-llama@128/1",), None)]
        if self.cpu:
            runs = [("fp32 triton", "triton", "float32", ("tiny-gemma3",), None)]
        before = os.environ.get("LOCALSERVE_ATTENTION")
        for name, attn, dtype, models, rtol in runs + ([] if self.cpu else fp8_kv):
            os.environ["LOCALSERVE_ATTENTION"] = attn
            made = []

            def make():
                made.append(CUDABackend(device=self.device))
                return made[-1]

            try:
                kw = dict(max_new=6, lengths=(6, 19, 33)) if self.cpu else {}
                if "fp8-kv" in name:
                    kw["kv_dtype"] = "fp8"
                rep = run_conformance(make, models=models, dtype=dtype, logits_rtol=rtol, **kw)
                used = sorted({b.attention_name for b in made})
                fused = sorted({bool(b.model and b.model.fused) for b in made})
                out[name] = {"ok": rep.ok, "attention": used, "fused": fused,
                             "kv_dtype": sorted({str(b.kv_dtype) for b in made}),
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

    def sharegpt_like(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        ins = rng.integers(4, 401, n)
        outs = rng.integers(4, 359, n)
        return ins, outs

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
