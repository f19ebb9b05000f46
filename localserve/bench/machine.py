"""Facts about the machine a bench ran on, recorded next to its figures."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "llama_cpp_python": _version("llama_cpp_python"),
        "localserve": _version("localserve"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load_average(),
    }


class ForeignCpuMeter:
    """How busy the machine was with other processes while we measured: (all CPU time spent −
    this process's) / (wall time × cores), from /proc/stat and os.times(). 0 is a quiet machine;
    0.5 on 2 cores means another process held one core the whole time."""

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        values = [int(x) for x in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        busy = (sum(values[:8]) - idle) / ticks  # guest time is already inside user
        own = os.times()
        return time.monotonic(), busy, own.user + own.system

    def foreign_share(self) -> float | None:
        end = self._snapshot()
        if end is None or self._start is None:
            return None
        wall = end[0] - self._start[0]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if wall < 0.05:  # /proc/stat counts in clock ticks (10 ms): too coarse to say
            return None
        foreign = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return min(1.0, max(0.0, foreign / (wall * cores)))
