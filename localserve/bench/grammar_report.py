"""What `localserve bench --grammar` measured: timings, per-batch records, the phases of the
throughput comparison and the result with its table and JSON (see localserve/bench/grammar.py)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

STRICT = "tool_call_like"


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass(slots=True)
class Timings:
    """One timed function's calls: wall ms, and ms of CPU time of the calling thread (what the
    call itself cost: time the thread sat descheduled by other processes is not in it)."""

    label: str
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def stats(self) -> dict:
        return {"calls": len(self.wall_ms),
                **{f"{k}_{q}": f(getattr(self, f"{k}_ms")) for k in ("wall", "cpu")
                   for q, f in (("median", statistics.median), ("p99", lambda xs: _pct(xs, 0.99)), ("max", max))}}


@dataclass(slots=True)
class BatchRecord:
    """One batch run to completion: its requests' output lengths and, per engine step, the
    seconds it took, the tokens it emitted and whether it was a decode step (no request's first
    token in it: those steps ran a prefill)."""

    lengths: list[int]
    forced: int
    valid_json: int
    steps: list[tuple[float, int, bool]]
    per_schema: dict[str, list[int]]  # schema -> [forced, output] tokens

    @property
    def decode(self) -> list[tuple[float, int]]:
        return [(dt, n) for dt, n, is_decode in self.steps if is_decode]

    @property
    def tok_per_s(self) -> float:
        d = self.decode
        return sum(n for _, n in d) / sum(dt for dt, _ in d)


@dataclass(slots=True)
class Side:
    """Everything one engine did in a phase (completed batches only)."""

    constrained: bool
    jump_forward: bool
    batches: list[BatchRecord] = field(default_factory=list)

    def _sum(self, f) -> float:
        return sum(f(b) for b in self.batches)

    @property
    def output_tokens(self) -> int:
        return int(self._sum(lambda b: sum(b.lengths)))

    @property
    def forced_tokens(self) -> int:
        return int(self._sum(lambda b: b.forced))

    @property
    def decode_steps(self) -> int:
        return int(self._sum(lambda b: len(b.decode)))

    @property
    def decode_seconds(self) -> float:
        return self._sum(lambda b: sum(dt for dt, _ in b.decode))

    @property
    def tok_per_s(self) -> float:
        """Decode output tokens (jump-forward tokens included) per second of decode steps."""
        return self._sum(lambda b: sum(n for _, n in b.decode)) / self.decode_seconds

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.decode_seconds / self.decode_steps

    def summary(self) -> dict:
        return {"tok_per_s": self.tok_per_s, "ms_per_step": self.ms_per_step, "batches": len(self.batches),
                "output_tokens": self.output_tokens, "forced_tokens": self.forced_tokens,
                "decode_steps": self.decode_steps, "decode_seconds": self.decode_seconds,
                "valid_json": int(self._sum(lambda b: b.valid_json)),
                "requests": int(self._sum(lambda b: len(b.lengths)))}


@dataclass(slots=True)
class Phase:
    """Constrained and unconstrained engines stepped alternately, one step each in turn."""

    concurrency: int
    jump_forward: bool
    constrained: Side
    unconstrained: Side
    foreign_cpu: float | None

    @property
    def key(self) -> str:
        return f"{self.concurrency} concurrent, jump-forward {'on' if self.jump_forward else 'off'}"

    @property
    def rate_ratio(self) -> float:
        """Constrained / unconstrained decode tok/s over the whole phase."""
        return self.constrained.tok_per_s / self.unconstrained.tok_per_s

    def batch_ratios(self) -> list[float]:
        """The same ratio batch by batch (k-th constrained batch vs k-th unconstrained)."""
        return [c.tok_per_s / u.tok_per_s for c, u in zip(self.constrained.batches, self.unconstrained.batches)]

    def step_ratios(self) -> list[float]:
        """Unconstrained / constrained seconds of the i-th decode step of the k-th batches, where
        both batches ran the same lengths one token per step (jump-forward off): the same batch
        shape, the same positions, one step apart in time. > 1: the constrained step was faster."""
        out = []
        for c, u in zip(self.constrained.batches, self.unconstrained.batches):
            if c.lengths == u.lengths and len(c.decode) == len(u.decode) and not c.forced:
                out += [du / dc for (dc, _), (du, _) in zip(c.decode, u.decode)]
        return out

    def summary(self) -> dict:
        br, sr = self.batch_ratios(), self.step_ratios()
        return {"constrained": self.constrained.summary(), "unconstrained": self.unconstrained.summary(),
                "rate_ratio": self.rate_ratio, "batch_ratios": br,
                "median_step_ratio": statistics.median(sr) if sr else None, "step_pairs": len(sr),
                "foreign_cpu": self.foreign_cpu}


@dataclass(slots=True)
class GrammarBenchResult:
    model: str
    threads: int
    max_tokens: int
    repeats: int
    timings: dict[str, Timings] = field(default_factory=dict)  # of the mask pass, by function
    mask_foreign_cpu: float | None = None
    phases: list[Phase] = field(default_factory=list)
    machine: dict = field(default_factory=dict)

    def mask_stats(self) -> dict:
        return {k: t.stats() for k, t in self.timings.items()}

    def forced_by_schema(self) -> dict[str, list[int]]:
        """Schema -> [forced, output] tokens over the constrained batches run with jump-forward."""
        out: dict[str, list[int]] = {}
        for ph in self.phases:
            if ph.jump_forward:
                for b in ph.constrained.batches:
                    for name, (forced, n) in b.per_schema.items():
                        acc = out.setdefault(name, [0, 0])
                        acc[0] += forced
                        acc[1] += n
        return out

    def to_dict(self) -> dict:
        return {"model": self.model, "threads": self.threads, "max_tokens": self.max_tokens,
                "repeats": self.repeats, "machine": self.machine, "mask_foreign_cpu": self.mask_foreign_cpu,
                "mask": self.mask_stats(), "timings": {k: asdict(t) for k, t in self.timings.items()},
                "phases": {ph.key: {**ph.summary(), "raw": asdict(ph)} for ph in self.phases},
                "forced_by_schema": self.forced_by_schema()}

    def table(self) -> str:
        lines = ["| mask figure | wall median ms | wall p99 ms | thread-CPU median ms | thread-CPU p99 ms | calls |",
                 "|---|---:|---:|---:|---:|---:|"]
        for t in self.timings.values():
            m = t.stats()
            lines.append(f"| {t.label} | {m['wall_median']:.3f} | {m['wall_p99']:.3f} | {m['cpu_median']:.3f} "
                         f"| {m['cpu_p99']:.3f} | {m['calls']} |")
        lines += ["", f"Others' CPU share during the mask pass: {_share(self.mask_foreign_cpu)}.", "",
                  "| concurrency, jump-forward | constrained tok/s | unconstrained tok/s | ratio | ratio per batch pair "
                  "| ms/step con / unc | paired step ratio unc/con (median) | forced share | valid JSON | others' CPU |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for ph in self.phases:
            s = ph.summary()
            con, unc = s["constrained"], s["unconstrained"]
            step = "n/a (steps differ)" if s["median_step_ratio"] is None else \
                f"{s['median_step_ratio']:.3f} ({s['step_pairs']} pairs)"
            lines.append(
                f"| {ph.key} | {con['tok_per_s']:.1f} | {unc['tok_per_s']:.1f} | {s['rate_ratio']:.3f} "
                f"| {_spread(s['batch_ratios'])} | {con['ms_per_step']:.1f} / {unc['ms_per_step']:.1f} | {step} "
                f"| {con['forced_tokens']}/{con['output_tokens']} = {con['forced_tokens'] / con['output_tokens']:.1%} "
                f"| {con['valid_json']}/{con['requests']} | {_share(ph.foreign_cpu)} |")
        lines += ["", "| schema | forced / output tokens (jump-forward on) |", "|---|---:|"]
        for name, (forced, total) in self.forced_by_schema().items():
            lines.append(f"| {name}{' (strict)' if name == STRICT else ''} | {forced}/{total} = {forced / total:.1%} |")
        lines += ["", f"{self.model}, {self.threads} threads, constrained max_tokens {self.max_tokens}, "
                  f"{self.repeats} passes per phase after a warm-up, {self.machine.get('date', '')}."]
        return "\n".join(lines)


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _spread(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return f"median {statistics.median(xs):.2f}, {min(xs):.2f}-{max(xs):.2f} (n={len(xs)})"


# ----------------------------------------------------------------------------- measuring
