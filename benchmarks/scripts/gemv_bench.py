"""Small-batch linear layers on the GPU, one device call: the Triton GEMV
(backends/triton_kernels/gemv.py) against cuBLAS (F.linear) on llama-3.1-8b's shapes.

* check: M = 1..MAX_M, with bias and float32 output, against torch on the same bf16 operands
* sweep: per shape, each (BLOCK_N, BLOCK_K, warps, stages) over 32 distinct weights (one per
  layer, so nothing is served from L2), in one CUDA graph: µs a call and TB/s
* chain: a whole batch-1 decode step's linear work (32 layers of norm, qkv, o, add+norm,
  gate|up, act*mul, down; the final norm and the output layer) in one graph: cuBLAS, the GEMV
  with its default configs, the GEMV with the sweep's best per shape

    python3 benchmarks/scripts/gemv_bench.py --out $OUT --budget 400 [--quick]
    python3 benchmarks/scripts/gemv_bench.py --out /tmp/x --cpu     # dry run here (interpreter, tiny)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_harness import Bench  # noqa: E402  (maps localserve.backends on the device)

HIDDEN, INTER, VOCAB, L = 4096, 14336, 128256, 32  # llama-3.1-8b
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN),
          "down": (HIDDEN, INTER), "head": (VOCAB, HIDDEN)}


def graph_us(fn, calls: int, reps: int = 20) -> float:
    """µs per call of fn (which makes `calls` calls), replayed in a CUDA graph: median of 5."""
    import torch

    if not torch.cuda.is_available():  # the --cpu dry run: the calls run, nothing is timed
        fn()
        return 1.0
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps / calls)
    del g
    return statistics.median(times)


class GemvBench:
    def __init__(self, b: Bench) -> None:
        import torch

        from localserve.backends.triton_kernels import gemv as G

        self.b, self.G, self.torch = b, G, torch
        self.dev = "cpu" if b.cpu else "cuda"
        self.dtype = torch.float32 if b.cpu else torch.bfloat16
        scale = 64 if b.cpu else 1
        self.shapes = {k: (max(16, n // scale), max(16, kk // scale)) for k, (n, kk) in SHAPES.items()}
        self.layers = 2 if b.cpu else L
        self.weights: dict = {}

    def w(self, name: str) -> list:
        if name not in self.weights:
            n, k = self.shapes[name]
            count = 1 if name == "head" else self.layers
            self.weights[name] = [self.torch.randn(n, k, device=self.dev, dtype=self.dtype) * 0.02
                                  for _ in range(count)]
        return self.weights[name]

    def check(self) -> dict:
        torch, G = self.torch, self.G
        out = {}
        n, k = 256, 512
        w = torch.randn(n, k, device=self.dev, dtype=self.dtype) * 0.05
        bias = torch.randn(n, device=self.dev, dtype=self.dtype)
        for m in range(1, G.MAX_M + 1):
            x = torch.randn(m, k, device=self.dev, dtype=self.dtype)
            ref = x.float() @ w.float().T
            logits = torch.empty(m, n, device=self.dev, dtype=torch.float32)
            got = {"plain": G.gemv(x, w), "bias": G.gemv(x, w, bias),
                   "f32_out": G.gemv(x, w, out=logits)}
            refs = {"plain": ref, "bias": ref + bias.float(), "f32_out": ref}
            for key, y in got.items():
                out[f"m{m}_{key}_max_abs_err"] = round((y.float() - refs[key]).abs().max().item(), 5)
            out[f"m{m}_ref_max"] = round(ref.abs().max().item(), 3)
            out[f"m{m}_f32_out_is_rounded"] = bool(torch.equal(logits, logits.to(self.dtype).float()))
        return out

    def configs(self):
        if self.b.cpu:
            return [(16, 128, 1, 1)]
        grid = itertools.product((2, 4, 8), (512, 1024, 2048, 4096), (4, 8), (2, 3, 4))
        return [c for c in grid if c[0] * c[1] <= 2048 * c[2]]

    def time_gemv(self, name: str, m: int, cfg) -> float:
        torch, G = self.torch, self.G
        ws = self.w(name)
        x = torch.randn(m, self.shapes[name][1], device=self.dev, dtype=self.dtype)
        return graph_us(lambda: [G.gemv(x, t, cfg=cfg) for t in ws], len(ws))

    def gb(self, name: str) -> float:
        ws = self.w(name)
        return sum(t.numel() for t in ws) * 2 / 1e9 / len(ws)

    def sweep(self) -> dict:
        torch, G = self.torch, self.G
        res = {}
        self.best = {}
        for name in self.shapes:
            ws = self.w(name)
            n, k = self.shapes[name]
            gb = self.gb(name)
            row = {}
            for m in (1, 2, 4):
                x = torch.randn(m, k, device=self.dev, dtype=self.dtype)
                us = graph_us(lambda: [torch.nn.functional.linear(x, t) for t in ws], len(ws))
                row[f"m{m}_cublas"] = (round(us, 2), round(gb / us * 1e3, 3))
            for m in range(1, G.MAX_M + 1):
                us = self.time_gemv(name, m, None)
                row[f"m{m}_gemv_default"] = (round(us, 2), round(gb / us * 1e3, 3),
                                             G.config(n, k))
            if not self.b.args.quick:
                timed = []
                for cfg in self.configs():
                    try:
                        timed.append((self.time_gemv(name, 1, cfg), cfg))
                    except Exception as exc:  # a config Triton cannot compile or launch
                        self.b.log("fail", name, cfg, repr(exc)[:200])
                timed.sort()
                row["m1_top6"] = {str(c): round(u, 2) for u, c in timed[:6]}
                self.best[name] = timed[0][1]
            self.b.log(name, {k: v for k, v in row.items() if "top" not in k})
            res[name] = row
        return res

    def chain(self) -> dict:
        torch, G = self.torch, self.G
        from localserve.backends.triton_kernels import fused as F
        nq = self.shapes["o"][1]
        qkv, o, gu, down, head = (self.w(n) for n in ("qkv", "o", "gate_up", "down", "head"))
        hdim = self.shapes["o"][0]
        g = torch.ones(hdim, device=self.dev, dtype=self.dtype)
        res0 = torch.randn(1, hdim, device=self.dev, dtype=self.dtype)
        logits = torch.empty(1, self.shapes["head"][0], device=self.dev, dtype=torch.float32)

        def variant(use_gemv: bool, cfgs: dict):
            def lin(x, t, name, out=None):
                if use_gemv:
                    return G.gemv(x, t, out=out, cfg=cfgs.get(name))
                y = torch.nn.functional.linear(x, t)
                return y if out is None else out.copy_(y)

            def run():
                residual = res0.clone()
                delta = None
                for i in range(self.layers):
                    x = (F.rms_norm(residual, g, 1e-5) if delta is None
                         else F.add_rms_norm(delta, residual, g, 1e-5))
                    a = lin(x, qkv[i], "qkv")[:, :nq].contiguous()
                    x = F.add_rms_norm(lin(a, o[i], "o"), residual, g, 1e-5)
                    delta = lin(F.act_mul(lin(x, gu[i], "gate_up"), "silu"), down[i], "down")
                lin(F.add_rms_norm(delta, residual, g, 1e-5), head[0], "head", out=logits)
            return run

        out = {}
        gb = (sum(t.numel() for ws in (qkv, o, gu, down) for t in ws) + head[0].numel()) * 2 / 1e9
        variants = {"cublas": (False, {}), "gemv_default": (True, {}),
                    "gemv_best_of_sweep": (True, getattr(self, "best", {}))}
        ref = None
        for label, args in variants.items():
            ms = graph_us(variant(*args), 1, reps=10) / 1e3
            out[label] = {"ms": round(ms, 4), "TB/s": round(gb / ms, 3)}
            if ref is None:
                ref = logits.clone()
            out[label]["logits_max_abs_diff_vs_cublas"] = round(
                (logits - ref).abs().max().item(), 4)
            out[label]["logits_max_abs"] = round(logits.abs().max().item(), 3)
            self.b.log(label, out[label])
        out["weights_GB"] = round(gb, 3)
        out["best_of_sweep"] = {k: str(v) for k, v in getattr(self, "best", {}).items()}
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=400)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--quick", action="store_true", help="no config sweep: the defaults only")
    args = ap.parse_args()
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    b = Bench(args)
    gb = GemvBench(b)
    b.section("env", 30, b.env)
    b.section("check", 20, gb.check)
    b.section("sweep", 20 if args.quick else 150, gb.sweep)
    b.section("chain", 40, gb.chain)
    b.results["total_seconds"] = round(b.args.budget - b.left(), 1)
    b.save()


if __name__ == "__main__":
    main()
