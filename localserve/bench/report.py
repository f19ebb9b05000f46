"""Rendering a BenchResult: a plain table for the terminal, a markdown table for BENCHMARKS.md."""

from __future__ import annotations

from dataclasses import dataclass

from localserve.bench.suite import BenchResult

LOCAL, PEER = "localserve", "llama.cpp"


@dataclass(slots=True)
class Row:
    label: str
    unit: str
    higher_is_better: bool
    local: float | None
    peer: float | None
    local_range: tuple[float, float] | None = None
    peer_range: tuple[float, float] | None = None
    foreign_cpu: float | None = None  # other processes' share of the CPU meanwhile

    @property
    def ratio(self) -> float | None:
        """localserve / llama.cpp: above 1 is better for tok/s, below 1 is better for ms."""
        if self.local is None or self.peer is None or self.peer == 0:
            return None
        return self.local / self.peer


def _range(values: list[float] | None) -> tuple[float, float] | None:
    return (min(values), max(values)) if values else None


def rows(result: BenchResult) -> list[Row]:
    out = [
        Row(f.label, f.unit, f.higher_is_better, f.median(LOCAL), f.median(PEER),
            _range(f.samples.get(LOCAL)), _range(f.samples.get(PEER)), f.foreign_cpu)
        for f in result.figures
    ]
    cold, hit = result.figure("prefix_cold"), result.figure("prefix_hit")
    if cold is not None and hit is not None:
        def speedup(engine: str) -> float | None:
            c, h = cold.median(engine), hit.median(engine)
            return c / h if c is not None and h else None

        out.append(Row("prefix cache speedup, cold TTFT / hit TTFT", "x", True, speedup(LOCAL), speedup(PEER)))
    return out


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.1f}x"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _noisiest(result: BenchResult) -> float | None:
    values = [f.foreign_cpu for f in result.figures if f.foreign_cpu is not None]
    return max(values) if values else None


def _fmt_ratio(row: Row) -> str:
    r = row.ratio
    return "-" if r is None else f"{r:.3g}"


def text_table(result: BenchResult) -> str:
    rs = rows(result)
    width = max(len(f"{r.label} [{r.unit}]") for r in rs) if rs else 10
    head = f"{'figure':<{width}}  {'localserve':>22}  {'llama.cpp':>22}  {'ratio':>6}  better  others"
    lines = [head, "-" * len(head)]
    for r in rs:
        def cell(v, rng):
            s = _fmt(v, r.unit)
            if rng is not None and rng[0] != rng[1]:
                s += f" ({_fmt(rng[0], r.unit)}-{_fmt(rng[1], r.unit)})"
            return s

        lines.append(
            f"{r.label + ' [' + r.unit + ']':<{width}}  {cell(r.local, r.local_range):>22}  "
            f"{cell(r.peer, r.peer_range):>22}  {_fmt_ratio(r):>6}  {'higher' if r.higher_is_better else 'lower':<6}  {_pct(r.foreign_cpu):>6}"
        )
    lines.append("")
    lines.append("median of repeats (min-max in brackets); ratio = localserve / llama.cpp; "
                 "others = CPU share other processes used meanwhile (0% = quiet machine)")
    lines += _footer(result)
    return "\n".join(lines)


def _footer(result: BenchResult) -> list[str]:
    m, c = result.machine, result.config
    lines = [
        f"machine: {m.get('cpu_model')}, {m.get('usable_cores')} cores, torch {m.get('torch')}, "
        f"llama-cpp-python {m.get('llama_cpp_python')}, {m.get('date')}",
        f"load average at start {m.get('load_average_at_start')}, at end {m.get('load_average_at_end')}",
        f"threads {c.get('threads')}, repeats {c.get('repeats')} after {c.get('warmup')} warm-up, seed {c.get('seed')}",
    ]
    for name, info in result.engines.items():
        if "batch_mode" in info:
            lines.append(f"{name} serves concurrent requests by {info['batch_mode']}")
    lines += [f"note: {n}" for n in result.notes]
    return lines


def markdown_table(result: BenchResult) -> str:
    lines = ["| figure | localserve | llama.cpp | ratio |", "|---|---:|---:|---:|"]
    for r in rows(result):
        unit = "" if r.unit == "x" else f" ({r.unit}, {'higher' if r.higher_is_better else 'lower'} is better)"
        lines.append(f"| {r.label}{unit} | {_fmt(r.local, r.unit)} | {_fmt(r.peer, r.unit)} | {_fmt_ratio(r)} |")
    m, c = result.machine, result.config
    lines.append("")
    lines.append(
        f"Medians of {c.get('repeats')} after {c.get('warmup')} warm-up, {c.get('threads')} threads; "
        f"ratio = localserve / llama.cpp. {m.get('cpu_model')}, {m.get('usable_cores')} cores, "
        f"torch {m.get('torch')}, llama-cpp-python {m.get('llama_cpp_python')}, {m.get('date')}. "
        "llama.cpp's concurrent figures are the requests run back to back (one Llama object serves "
        "one sequence, as its Python server does). "
        f"Other processes used at most {_pct(_noisiest(result))} of the CPU during any figure."
    )
    return "\n".join(lines)
