"""run_bench: load the engines, run every probe with warm-up and interleaved repeats, collect."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from localserve.bench.config import BenchConfig
from localserve.bench.figures import Figure, Probe, build_probes
from localserve.bench.machine import ForeignCpuMeter, load_average, machine_info
from localserve.bench.prompts import DECODE_TEXT, PromptFactory, TextEncoder
from localserve.bench.timing import Runner

Log = Callable[[str], None]

# other processes' CPU share above which a run counts as noisy
NOISY = 0.1


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(slots=True)
class BenchResult:
    config: dict
    machine: dict
    engines: dict[str, dict]  # engine name -> how it was set up
    figures: list[Figure]
    notes: list[str] = field(default_factory=list)

    @property
    def engine_names(self) -> list[str]:
        return list(self.engines)

    def figure(self, key: str) -> Figure | None:
        return next((f for f in self.figures if f.key == key), None)

    def to_dict(self) -> dict:
        figures = []
        for f in self.figures:
            d = asdict(f)
            d["median"] = {e: f.median(e) for e in f.samples}
            figures.append(d)
        return {"config": self.config, "machine": self.machine, "engines": self.engines,
                "figures": figures, "notes": self.notes}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> "BenchResult":
        figures = []
        for fd in d["figures"]:
            fd = {k: v for k, v in fd.items() if k != "median"}
            figures.append(Figure(**fd))
        return cls(d["config"], d["machine"], d["engines"], figures, d.get("notes", []))

    @classmethod
    def read_json(cls, path: str | Path) -> "BenchResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_localserve(cfg: BenchConfig):
    from localserve.engine.backend import BackendConfig
    from localserve.engine.llm_engine import EngineConfig
    from localserve.runtime.loader import load_model

    max_seqs = cfg.max_num_seqs or max(64, *cfg.concurrency)
    block_size = EngineConfig().block_size
    engine_cfg = EngineConfig(max_num_seqs=max_seqs, num_blocks=cfg.num_blocks or _bench_blocks(cfg, block_size))
    backend_cfg = BackendConfig(num_threads=cfg.threads, max_num_seqs=max_seqs,
                                max_num_batched_tokens=engine_cfg.max_num_batched_tokens)
    return load_model(cfg.model, backend=cfg.backend, backend_cfg=backend_cfg, engine_cfg=engine_cfg)


def _bench_blocks(cfg: BenchConfig, block_size: int) -> int:
    """A KV pool sized to the workload (4x what the largest figure holds at once, at least 8k
    tokens), not "all that fits": that would zero half the RAM before the first figure."""
    short = 64  # a fresh header + short question, generously
    held = max(
        max(cfg.concurrency) * (short + cfg.concurrent_tokens),
        2 * (short + cfg.prefix_tokens),
        cfg.prefill_tokens + 1,
        short + cfg.decode_tokens,
    )
    return max(4 * held, 8192) // block_size + 1


def _plain_encode(tok):
    """text -> ids without special tokens; None when the model has no tokenizer."""
    if tok is None:
        return None
    return lambda text: tok.encode(text, add_special_tokens=False)


def _peer_skip_reason(cfg: BenchConfig, source: str) -> str | None:
    if not cfg.peer:
        return "--no-peer"
    if not source.endswith(".gguf"):
        return f"llama.cpp needs a GGUF file; the model is {source!r}"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install 'localserve[bench]')"
    return None


def wait_until_quiet(max_wait: float, log: Log, threshold: float = NOISY) -> float | None:
    """Samples 1 s windows until other processes use under `threshold` of the CPU, at most max_wait s."""
    deadline = time.monotonic() + max_wait
    while True:
        meter = ForeignCpuMeter()
        time.sleep(1.0)
        share = meter.foreign_share()
        if share is None or share < threshold:
            return share
        if time.monotonic() >= deadline:
            log(f"  machine still busy ({share:.0%} of the CPU used by others) after {max_wait:.0f} s; measuring anyway")
            return share


def measure(probe: Probe, runners: list[Runner], prompts: PromptFactory, cfg: BenchConfig,
            log: Log) -> list[Figure]:
    """Warm-up, then repeats that interleave the engines (a burst of load elsewhere hits both alike)."""
    figs = {f.key: f for f in probe.figures()}
    for f in figs.values():
        if f.key.startswith("concurrent"):
            f.notes = {r.name: r.batch_mode for r in runners}
    log(f"measuring {', '.join(f.label for f in figs.values())}")
    for _ in range(cfg.warmup):
        inputs = probe.inputs(prompts)
        for r in runners:
            probe.run(r, inputs)
    for i in range(cfg.repeats):
        inputs = probe.inputs(prompts)
        for r in runners:
            for attempt in range(cfg.retry_noisy + 1):
                if cfg.quiet_wait > 0:
                    wait_until_quiet(cfg.quiet_wait, log)
                t0 = time.perf_counter()
                meter = ForeignCpuMeter()
                samples = probe.run(r, inputs)
                foreign = meter.foreign_share()
                if foreign is None or foreign <= NOISY or attempt == cfg.retry_noisy:
                    break
                log(f"  repeat {i + 1} {r.name}: others used {foreign:.0%} of the CPU, measuring again")
                # the rerun needs prompts nothing has cached yet; the same lengths as before
                inputs = probe.inputs(prompts)
            for key, sample in samples.items():
                figs[key].add(r.name, sample.value, {**sample.detail, "foreign_cpu": foreign})
            log(f"  repeat {i + 1}/{cfg.repeats} {r.name}: "
                + ", ".join(f"{k}={figs[k].samples[r.name][-1]:.1f}" for k in figs)
                + f" ({time.perf_counter() - t0:.1f} s"
                + (f", others used {foreign:.0%} of the CPU)" if foreign is not None else ")"))
    for f in figs.values():
        shares = [d["foreign_cpu"] for ds in f.details.values() for d in ds if d["foreign_cpu"] is not None]
        f.foreign_cpu = sum(shares) / len(shares) if shares else None
        if f.foreign_cpu is not None and f.foreign_cpu > NOISY:
            log(f"  warning: other processes used {f.foreign_cpu:.0%} of the CPU while {f.key} ran")
    return list(figs.values())


def run_bench(cfg: BenchConfig, log: Log = _stderr) -> BenchResult:
    machine = machine_info()
    notes: list[str] = []
    log(f"loading localserve model {cfg.model or 'default'} (backend {cfg.backend}, {cfg.threads} threads)")
    loaded = load_localserve(cfg)
    from localserve.bench.engine_runner import EngineRunner

    runners: list[Runner] = [EngineRunner(loaded)]
    tok = loaded.tokenizer
    encoder = TextEncoder(_plain_encode(tok), loaded.config.vocab_size, loaded.config.bos_token_id)
    if tok is None:
        notes.append("the model has no tokenizer: prompts are hashed words of the same lengths")

    skip = _peer_skip_reason(cfg, loaded.source)
    if skip is None:
        from localserve.bench.llamacpp_runner import LlamaCppRunner

        log(f"loading llama.cpp on {loaded.source}")
        peer = LlamaCppRunner(loaded.source, cfg.threads, n_ctx=cfg.peer_ctx)
        runners.append(peer)
        # both engines get the same ids; say whether their own tokenizers would have agreed
        ours, theirs = encoder(DECODE_TEXT), peer.tokenize(DECODE_TEXT)
        if ours != theirs:
            notes.append(f"tokenizers disagree on {DECODE_TEXT!r}: localserve {ours} vs llama.cpp {theirs}")
    else:
        notes.append(f"llama.cpp not measured: {skip}")

    engines = {r.name: r.describe() for r in runners}
    prompts = PromptFactory(encoder, seed=cfg.seed)
    figures: list[Figure] = []
    try:
        for probe in build_probes(cfg):
            figures += measure(probe, runners, prompts, cfg, log)
    finally:
        for r in runners:
            r.close()
    machine["load_average_at_end"] = load_average()
    config = asdict(cfg)
    config["only"] = list(cfg.only)
    config["concurrency"] = list(cfg.concurrency)
    return BenchResult(config, machine, engines, figures, notes)
