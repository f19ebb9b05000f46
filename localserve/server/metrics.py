"""Prometheus metrics in the text exposition format (version 0.0.4), with stable `localserve_`
names. Counters and histograms are updated by the serving path; gauges that describe the engine
(running, waiting, KV pages, prefix cache) are read from it at scrape time."""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 30.0, 60.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


@dataclass
class Counter:
    name: str
    help: str
    labelnames: tuple[str, ...] = ()
    _values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        # the 0.0.4 text format names a counter family by its sample name, `_total` included
        lines = [f"# HELP {self.name}_total {self.help}", f"# TYPE {self.name}_total counter"]
        values = self._values or ({(): 0.0} if not self.labelnames else {})
        for labels, v in sorted(values.items()):
            lines.append(f"{self.name}_total{_labels(self.labelnames, labels)} {_num(v)}")
        return lines


@dataclass
class Gauge:
    """A value read from its owner at scrape time; kind "counter" for lifetime totals it keeps."""

    name: str
    help: str
    read: Callable[[], float]
    kind: str = "gauge"

    def render(self) -> list[str]:
        sample = f"{self.name}_total" if self.kind == "counter" else self.name
        return [f"# HELP {sample} {self.help}", f"# TYPE {sample} {self.kind}", f"{sample} {_num(self.read())}"]


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    _counts: list[int] = field(default_factory=list)
    _sum: float = 0.0
    _count: int = 0

    def __post_init__(self) -> None:
        self._counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self._counts):
            self._counts[i] += 1
        self._sum += value
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self._counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self._count}')
        lines.append(f"{self.name}_sum {_num(self._sum)}")
        lines.append(f"{self.name}_count {self._count}")
        return lines


class ServerMetrics:
    """What the serving path records. Updates come from the event loop thread; the lock keeps a
    scrape from reading a histogram half-updated."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = Counter("localserve_requests", "Finished requests by status.", ("status",))
        self.prompt_tokens = Counter("localserve_prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter("localserve_generation_tokens", "Generated tokens.")
        self.ttft = Histogram("localserve_time_to_first_token_seconds", "Time from arrival to the first token.")
        self.itl = Histogram("localserve_inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = Histogram("localserve_request_latency_seconds", "Time from arrival to the last token.")
        self.gauges: list[Gauge] = []

    def add_gauge(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge") -> None:
        self.gauges.append(Gauge(name, help, read, kind))

    def render(self) -> str:
        with self.lock:
            lines: list[str] = []
            for m in (self.requests, self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e):
                lines += m.render()
        for g in self.gauges:
            lines += g.render()
        return "\n".join(lines) + "\n"
