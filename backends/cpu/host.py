"""Host facts the CPU backend sizes itself by: physical cores and RAM (Linux /proc, with fallbacks)."""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Distinct (package, core) pairs; SMT siblings share a core's FMA units, so torch
    intra-op threads beyond this only add contention."""
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys or "0", core))
                    phys = core = None
            if core is not None:
                cores.add((phys or "0", core))
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(len(cores) or usable, usable))


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def total_ram_bytes() -> int:
    value = _meminfo("MemTotal")
    if value is None:
        value = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return value


def available_ram_bytes() -> int:
    value = _meminfo("MemAvailable")
    if value is None:
        value = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return value
