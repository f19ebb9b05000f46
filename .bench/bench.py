import sys, time, torch, numpy as np
dev = sys.argv[1]
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 0
if threads: torch.set_num_threads(threads)
from localserve.backends.torch_common.sampling import sample
from localserve.engine.plan import SamplingRow
from localserve.engine.sampling_params import SamplingParams as P
V = 262144
def sync():
    if dev == "cuda": torch.cuda.synchronize()
def bench(x, rows, n=30):
    for _ in range(3): sample(x, rows)
    ts = []
    for i in range(n):
        for r in rows: r.step += 1
        sync(); s = time.perf_counter(); sample(x, rows); ts.append(time.perf_counter() - s)
    return min(ts) * 1e3, float(np.median(ts)) * 1e3
g = torch.Generator().manual_seed(0)
real = torch.load(".bench/real_logits.pt")
cases = (("greedy", dict(temperature=0.0)), ("random T=1", dict()), ("top_p=0.9", dict(top_p=0.9)),
         ("top_p=.95 T=.7", dict(top_p=0.95, temperature=0.7)), ("top_k=50", dict(top_k=50)),
         ("min_p=0.05", dict(min_p=0.05)), ("top_p=0.1", dict(top_p=0.1)),
         ("top_p+logprobs5", dict(top_p=0.9, logprobs=True, top_logprobs=5)),
         ("greedy+penalties", dict(temperature=0, repetition_penalty=1.1, frequency_penalty=0.5)))
print("device", dev, "threads", torch.get_num_threads(), torch.__version__)
for S in ((1, 16) if dev == "cpu" else (1, 16, 64)):
    srcs = [("gemma fp32", real[(torch.arange(S) % 16)]), ("randn (flat)", torch.randn(S, V, generator=g)),
            ("gemma bf16", real[(torch.arange(S) % 16)].bfloat16())]
    for name, x in srcs:
        x = x.to(dev)
        for label, kw in cases:
            if name == "gemma bf16" and label not in ("greedy", "top_p=0.9"): continue
            rows = [SamplingRow(P(**kw), i, 0, list(range(0, 4000, 3)), list(range(100))) for i in range(S)]
            mn, md = bench(x, rows)
            print(f"S={S:2d} {name:13s} {label:17s} min {mn:7.2f} ms  median {md:7.2f} ms", flush=True)
