"""Issue 15's GPU Show through the product: `localserve up random:llama-3.1-8b` with no flags
(or `--weights fp8`), driven over HTTP by `localserve bench --serving`, with the in-process engine
on the very same token ids in the same call beside each figure.

    python3 benchmarks/scripts/gpu_serving_show.py --out $OUT                      # bf16: a, b, d, f
    python3 benchmarks/scripts/gpu_serving_show.py --out $OUT --weights fp8 --parts b

The in-process engine runs first, in a process of its own (so the GPU is free again for the
server): one load, a warm-up workload, then each part. Then the server starts (time to ready
measured), the same warm-up goes through HTTP, and each part runs as the `localserve bench
--serving` command printed beside it. Parts: a = batch-1 stream (128 in, 512 out, 3 requests one
at a time); b = 1,000 prompts all at once, in 4-400 / out 4-358 uniform (seed 0: the lengths
of benchmarks/scripts/gpu_bench.py's Show b); d = 1,024 prompts over 64 shared 2,048-token prefixes + 128
own tokens, 256 out, all at once (the server's prefix-cache hit rate); f = 64 Poisson arrivals
at 4, 8 and 16 requests/s with b's lengths. Results: OUT/serving_show.json, a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

MODEL = "random:llama-3.1-8b"
BACKEND = "cuda"
PORT = 8000
PARTS = {
    "a": dict(num_prompts=3, input_len="128", output_len="512", max_concurrency=1, seed=1),
    "b": dict(num_prompts=1000, input_len="4:400", output_len="4:358", seed=0),
    "d": dict(dataset="prefix-repetition", num_prompts=1024, num_prefixes=64, prefix_len=2048, input_len="128",
              output_len="256", seed=3),
    "f4": dict(num_prompts=64, input_len="4:400", output_len="4:358", request_rate=4.0, seed=4),
    "f8": dict(num_prompts=64, input_len="4:400", output_len="4:358", request_rate=8.0, seed=8),
    "f16": dict(num_prompts=64, input_len="4:400", output_len="4:358", request_rate=16.0, seed=16),
}
# kernels and graphs for every batch size b reaches, before anything is timed (both sides)
WARM = dict(num_prompts=256, input_len="4:400", output_len="4:64", seed=99)


def dry_run() -> None:
    """--cpu: the same steps on a tiny model and small parts, to check the script here."""
    global MODEL, BACKEND, WARM
    MODEL, BACKEND = "random:tiny-llama", "cpu"
    for kw in PARTS.values():
        kw["num_prompts"] = max(2, kw["num_prompts"] // 32)
        kw.update(num_prefixes=4, prefix_len=64) if "prefix_len" in kw else None
    WARM = dict(WARM, num_prompts=8)


def config(**kw):
    from localserve.bench.serving_config import ServingBenchConfig

    return ServingBenchConfig(url=f"http://127.0.0.1:{PORT}", **kw)


def part_names(parts: str) -> list[str]:
    names = []
    for p in parts.split(","):
        names += [k for k in PARTS if k == p or (p == "f" and k.startswith("f"))]
    return names


def in_process(out: Path, weights: str, names: list[str]) -> dict:
    """Every part into one in-process engine, the server's batch shape; figures as the HTTP
    client reports them."""
    from localserve.backends import select_backend
    from localserve.bench.serving import build_workload
    from localserve.bench.serving_inprocess import run_workloads
    from localserve.bench.serving_metrics import summarize
    from localserve.models.presets import preset_config

    vocab = preset_config(MODEL.split(":", 1)[1]).vocab_size
    cfgs = [config(**PARTS[n]) for n in names]
    works = [(build_workload(c, "ids", 1.0, vocab, c.num_prompts, c.seed), c.max_concurrency) for c in cfgs]
    warm = config(**WARM)
    seqs = select_backend(BACKEND).serving_defaults().max_num_seqs
    t0 = time.perf_counter()
    runs, described = run_workloads(works, build_workload(warm, "ids", 1.0, vocab, warm.num_prompts, warm.seed),
                                    model=MODEL, backend=BACKEND, threads=None, max_num_seqs=seqs,
                                    weight_format=weights, log=lambda m: print(m, flush=True))
    res = {"engine": described, "wall_s": round(time.perf_counter() - t0, 1)}
    for name, (results, cpu) in zip(names, runs):
        res[name] = summarize(results) | {"process_cpu_s": cpu}
    return res


def start_server(out: Path, weights: str) -> tuple[subprocess.Popen, float]:
    args = [sys.executable, "-m", "localserve", "up", MODEL, "--port", str(PORT)]
    args += ["--backend", "cpu"] if BACKEND == "cpu" else []
    if weights != "auto":
        args += ["--weights", weights]
    log = open(out / f"up-{weights}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    while time.perf_counter() - t0 < 300:
        if proc.poll() is not None:
            raise RuntimeError(f"localserve up exited with {proc.returncode}: {(out / f'up-{weights}.log').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError("localserve up was not ready in 300 s")


def bench(cfg, json_path: Path | None) -> dict | None:
    from localserve.bench.serving_config import command_line

    cmd = command_line(cfg).split()[1:]  # drop "localserve"
    cmd = [sys.executable, "-m", "localserve", *cmd] + (["--json", str(json_path)] if json_path else [])
    print("+", " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    print(proc.stdout[-2500:], proc.stderr[-800:], flush=True)
    return json.loads(json_path.read_text()) if json_path and json_path.exists() else None


def through_http(out: Path, weights: str, names: list[str]) -> dict:
    proc, ready = start_server(out, weights)
    res: dict = {"time_to_ready_s": round(ready, 1)}
    try:
        status = httpx.get(f"http://127.0.0.1:{PORT}/api/status", timeout=10).json()
        res["server_status"] = status
        bench(config(**WARM), None)
        for name in names:
            cfg = config(**PARTS[name])
            d = bench(cfg, out / f"http-{weights}-{name}.json")
            if d is not None:
                res[name] = d["http"] | {"command": d["command"], "during_run": d["server"].get("during_run")}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            res["exit_status"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            res["exit_status"] = "killed after 60 s"
        left = subprocess.run(["pgrep", "-f", "localserve"], capture_output=True, text=True).stdout.split()
        res["processes_left"] = [p for p in left if int(p) != os.getpid()]
    return res


def table(inproc: dict, http: dict, names: list[str], weights: str) -> str:
    rows = [f"| part ({weights}) | in-process out tok/s | HTTP out tok/s | HTTP / in-process | TTFT p50 in-proc / HTTP (ms) "
            "| failed | extra |", "|---|---:|---:|---:|---|---:|---|"]
    for n in names:
        a, b = inproc.get(n) or {}, http.get(n) or {}
        ta, tb = a.get("output_throughput"), b.get("output_throughput")
        ratio = f"{tb / ta:.3f}" if ta and tb else "–"
        extra = ""
        during = b.get("during_run") or {}
        if during.get("prefix_query_tokens"):
            extra = f"hit {during['prefix_hit_tokens'] / during['prefix_query_tokens']:.1%}"
        rows.append(f"| {n} | {ta or 0:,.0f} | {tb or 0:,.0f} | {ratio} | {a.get('median_ttft_ms') or 0:.1f} / "
                    f"{b.get('median_ttft_ms') or 0:.1f} | {b.get('failed', '–')} | {extra} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--weights", default="auto", choices=("auto", "fp8"))
    ap.add_argument("--parts", default="a,b,d,f")
    ap.add_argument("--cpu", action="store_true", help="dry run here: a tiny model, small parts")
    ap.add_argument("--phase", choices=("all", "inproc"), default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu:
        dry_run()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = part_names(args.parts)
    if args.phase == "inproc":
        (out / f"inproc-{args.weights}.json").write_text(json.dumps(in_process(out, args.weights, names), indent=1))
        return
    t0 = time.perf_counter()
    with open(out / f"inproc-{args.weights}.log", "w") as log:
        sub = subprocess.run([sys.executable, __file__, "--out", str(out), "--weights", args.weights, "--parts",
                              args.parts, "--phase", "inproc"] + (["--cpu"] if args.cpu else []), timeout=420,
                             stdout=log, stderr=subprocess.STDOUT)
    inproc_file = out / f"inproc-{args.weights}.json"
    inproc = json.loads(inproc_file.read_text()) if inproc_file.exists() else {"error": f"exit {sub.returncode}"}
    print(f"in-process phase: {time.perf_counter() - t0:.0f} s", flush=True)
    http = through_http(out, args.weights, names)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "weights": args.weights,
              "in_process": inproc, "http": http, "table": table(inproc, http, names, args.weights)}
    (out / f"serving_show-{args.weights}.json").write_text(json.dumps(result, indent=1, default=str))
    print(result["table"])
    print(f"time to ready {http['time_to_ready_s']} s; exit status {http.get('exit_status')}; "
          f"left {http.get('processes_left')}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
