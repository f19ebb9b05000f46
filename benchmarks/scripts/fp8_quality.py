"""What FP8 (e4m3) weights do to a real checkpoint's predictions, measured on the CPU.

The GPU machine has no copy of a real checkpoint (only `random:` weights, whose logits say
nothing about quality), so this runs here: the embedded Gemma 3 270M (Q4_K_M GGUF, dequantized)
through the float32 CPU reference, teacher-forced over a fixed English + code text, three ways:
float32; every decoder-layer linear with its weight and input rounded to bf16 (what the bf16
GPU path multiplies); and the same linears in FP8 as backends/cuda/fp8.py computes them, with
its own `quantize_rows` (row-wise e4m3 weight scales, per-token activation scales), the product
taken in float32 as the H100's `_scaled_mm` accumulates it. Each of the last two also with
an FP8 KV cache (`--kv-dtype fp8`): every K and V rounded to e4m3 as the fused KV write stores
it (saturating, scale 1) before attention reads it. Per position against float32:
top-1 agreement, KL(fp32 || x) mean and p99; and each variant's perplexity of the text.

    python3 benchmarks/scripts/fp8_quality.py --out benchmarks/results/fp8-quality
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "scripts"))
import gpu_harness  # noqa: E402,F401  (maps localserve.backends without an editable install)

TEXT = """The history of computing is a story of abstractions. Early machines were programmed by
rewiring panels; then came stored programs, assemblers and compilers, each hiding the layer
below. Operating systems gave every program the illusion of a machine of its own, and
networks turned many machines into one. Today a language model can read a repository, explain
a function and propose a patch, but it still runs on the same arithmetic.

def merge_sorted(a, b):
    \"\"\"Merge two sorted lists into one sorted list.\"\"\"
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out

To test it, call merge_sorted([1, 4, 9], [2, 3, 10]) and check that the result is
[1, 2, 3, 4, 9, 10]. Edge cases are empty lists and lists with equal elements."""

LINEARS = ("qkv", "o_proj", "gate_up", "down")


class RoundedLinear:
    """y = round(x) @ round(W).T + b in float32, `round` a dtype's rounding (bf16)."""

    def __init__(self, lin, dtype) -> None:
        self.w = lin.weight.to(dtype).float()
        self.bias, self.dtype = lin.bias, dtype

    def __call__(self, x):
        y = x.to(self.dtype).float() @ self.w.T
        return y if self.bias is None else y + self.bias


class EmulatedFp8Linear:
    """fp8.Fp8Linear's arithmetic: row-wise e4m3 weight and per-token e4m3 input, the product
    of the dequantized operands in float32 (what _scaled_mm's float32 accumulation gives)."""

    def __init__(self, lin) -> None:
        from localserve.backends.cuda import fp8

        self.quantize = fp8.quantize_rows
        q, s = fp8.quantize_rows(lin.weight)
        self.w = q.float() * s
        self.bias = lin.bias

    def __call__(self, x):
        shape = x.shape
        q, s = self.quantize(x.reshape(-1, shape[-1]))
        y = ((q.float() * s) @ self.w.T).reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class E4m3KvAttention:
    """The reference attention over K/V rounded to e4m3 (what an fp8 KV cache holds)."""

    def __init__(self, inner) -> None:
        from localserve.backends.torch_common.attention import to_cache_dtype

        self.inner, self.to_cache = inner, to_cache_dtype

    def forward(self, q, k, v, *rest):
        import torch

        def e4m3(x):
            return self.to_cache(x, torch.float8_e4m3fn).to(x.dtype)

        return self.inner.forward(q, e4m3(k), e4m3(v), *rest)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def all_logits(be, ids: list[int]):
    """float32 logits [n, vocab] of every position of one prefill of ids."""
    import torch

    from localserve.backends.cuda.conformance import BLOCK_SIZE, _prefill_plan

    plan = _prefill_plan(ids, be.model.cfg.vocab_size)
    be.init_kv(-(-len(ids) // BLOCK_SIZE) + 1, BLOCK_SIZE)
    step = be.model.prepare(plan)
    step.logits_rows = torch.arange(len(ids))
    with torch.inference_mode():
        return be.model.forward(step, be.kv).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/fp8-quality")
    args = ap.parse_args()
    import torch

    from localserve.backends.cuda.conformance import _cpu_reference
    from localserve.models.gguf_tokenizer import load_gguf_tokenizer
    from localserve.models.loader import load_weights
    from localserve.runtime.default_model import default_model_path

    t0 = time.monotonic()
    path = default_model_path()
    tok, _ = load_gguf_tokenizer(path)
    enc = tok.encode(TEXT)
    ids = list(getattr(enc, "ids", enc))
    be, cfg = _cpu_reference()
    be.load(load_weights(path), cfg)
    layers = be.model.w.layers
    dense = [{n: getattr(lw, n) for n in LINEARS} for lw in layers]
    target = torch.tensor(ids[1:])
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "command": " ".join(sys.argv), "model": path.name, "tokens": len(ids)}
    ref = None
    attention = be.model.attention

    def bf16(lin):
        return RoundedLinear(lin, torch.bfloat16)

    for label, make, kv_fp8 in (("fp32", None, False), ("bf16", bf16, False),
                                ("bf16+kv_fp8", bf16, True), ("fp8", EmulatedFp8Linear, False),
                                ("fp8+kv_fp8", EmulatedFp8Linear, True)):
        for lw, orig in zip(layers, dense):
            for n, lin in orig.items():
                setattr(lw, n, lin if make is None else make(lin))
        be.model.attention = E4m3KvAttention(attention) if kv_fp8 else attention
        logits = all_logits(be, ids)
        lp = torch.log_softmax(logits[:-1], dim=-1)
        row = {"perplexity": round(float(torch.exp(-lp.gather(1, target[:, None]).mean())), 3)}
        if ref is None:
            ref, ref_lp = logits, lp
        else:
            kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).numpy()
            row |= {"top1_agreement_vs_fp32": round(float((logits.argmax(-1) == ref.argmax(-1))
                                                          .float().mean()), 4),
                    "kl_vs_fp32_mean": round(float(kl.mean()), 5),
                    "kl_vs_fp32_p99": round(float(np.percentile(kl, 99)), 5),
                    "max_abs_logit_diff": round(float((logits - ref).abs().max()), 3)}
        res[label] = row
        print(label, row, flush=True)
    res["seconds"] = round(time.monotonic() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_quality.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
