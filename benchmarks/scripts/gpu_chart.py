"""The chart of a benchmarks/scripts/gpu_bench.py result (needs matplotlib; drawn here, not on the device):

    python3 benchmarks/scripts/gpu_chart.py benchmarks/results/gpu-2026-11-23-h100.json benchmarks/results/gpu-2026-11-23-h100.png
    python3 benchmarks/scripts/gpu_bench.py --chart JSON PNG        # the same
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


# GPU.md's plain-PyTorch decode step (cuBLAS + SDPA, static cache, one CUDA graph), context 640
PLAIN_TORCH_DECODE = {1: 150, 8: 1143, 64: 7400, 256: 16380, 512: 18880}


def chart(json_path: str, png_path: str) -> None:
    """Three panels from a result JSON: decode tok/s vs batch (graph replay, against GPU.md's
    plain-PyTorch step), end-to-end throughputs against their targets, online latencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(Path(json_path).read_text())
    sec = r["sections"]
    llama = sec.get("llama", {})
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    sweep = llama.get("a_bs1_decode", {}).get("replay_sweep", [])
    if sweep:
        bs = [p["bs"] for p in sweep]
        ax[0].plot(bs, [p["fused_tok_s"] for p in sweep], "o-", label="localserve cuda (graph replay)")
        ax[0].plot(list(PLAIN_TORCH_DECODE), list(PLAIN_TORCH_DECODE.values()), "s--",
                   label="plain PyTorch step (GPU.md)")
        ax[0].set_xscale("log", base=2)
        ax[0].set_yscale("log")
        ax[0].set_xlabel("decode batch size (context 640)")
        ax[0].set_ylabel("output tok/s")
        ax[0].set_title("llama-3.1-8b bf16 decode step vs concurrency")
        ax[0].legend()
    bars = []
    a = llama.get("a_bs1_decode", {})
    if "decode_tok_s_median" in a:
        bars.append(("a: bs1 decode", a["decode_tok_s_median"], 170))
    b = llama.get("b_offline", {})
    if "output_tok_s" in b:
        bars.append(("b: 1000 prompts", b["output_tok_s"], 17000))
    b8 = sec.get("llama_fp8", {}).get("b_offline", {})
    if "output_tok_s" in b8:
        bars.append(("b: FP8 weights", b8["output_tok_s"], 17000))
    hf = sec.get("hf_peer", {})
    if "useful_output_tok_s" in hf:
        bars.append(("b: HF generate", hf["useful_output_tok_s"], None))
    c = sec.get("c_nanovllm", {})
    if "output_tok_s" in c:
        bars.append(("c: qwen3-0.6b", c["output_tok_s"], None))
    d = llama.get("d_shared_prefix", {})
    if "cache_on" in d:
        bars.append(("d: cache on", d["cache_on"]["output_tok_s"], None))
        bars.append(("d: cache off", d["cache_off"]["output_tok_s"], None))
    if bars:
        x = np.arange(len(bars))
        ax[1].bar(x, [v for _, v, _ in bars], color="tab:blue")
        for i, (_, v, t) in enumerate(bars):
            ax[1].text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
            if t:
                ax[1].plot([i - 0.4, i + 0.4], [t, t], "r-", lw=2)
        ax[1].set_yscale("log")
        ax[1].set_xticks(x, [n for n, _, _ in bars], rotation=25, ha="right", fontsize=8)
        ax[1].set_ylabel("output tok/s (red: target)")
        ax[1].set_title("end to end through LLMEngine")
    f = llama.get("f_online", {})
    rates = [k for k in ("4", "8", "16") if "ttft_p50_ms" in f.get(k, {})]
    if rates:
        for key, style in (("ttft_p50_ms", "o-"), ("ttft_p99_ms", "o--"), ("itl_p50_ms", "s-"),
                           ("itl_p99_ms", "s--")):
            ax[2].plot([int(k) for k in rates], [f[k][key] for k in rates], style,
                       label=key.replace("_ms", ""))
        ax[2].set_xlabel("Poisson arrival rate (req/s), b's lengths")
        ax[2].set_ylabel("ms")
        ax[2].set_title("f: online latency, llama-3.1-8b")
        ax[2].legend()
    env = r.get("env", {})
    fig.suptitle(f"localserve cuda backend, {env.get('gpu', '?')}, {r.get('date', '')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    chart(*sys.argv[1:3])
