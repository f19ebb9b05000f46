"""CPU seconds from /proc, for the benches that run beside a server: a process's own (utime +
stime, all its threads) and the whole machine's busy time, so that a run can say how much of the
machine the server, the client and everything else used."""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU seconds the machine's cores have been busy since boot (None without /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def _pids_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            pass
    return total


class CpuLoad:
    """CPU seconds over a run: the whole machine and the server's processes (its pid and engine
    pid from /api/status, when the server runs on this machine), so that the rest, less the
    client, is load from elsewhere."""

    def __init__(self, server_pids: tuple, url: str, cores: int) -> None:
        pids = set()
        if (urlparse(url).hostname or "") in LOCAL_HOSTS:
            pids = {p for p in server_pids if p and Path(f"/proc/{p}").exists()}
        self.pids, self.cores = sorted(pids), cores
        self.t0 = time.monotonic()
        self.busy0 = machine_busy_seconds()
        self.server0 = _pids_cpu(self.pids)

    def finish(self, client_cpu: float) -> dict:
        """client_cpu: all the client's CPU seconds since this began (its start-up too)."""
        wall = time.monotonic() - self.t0
        now = machine_busy_seconds()
        busy = now - self.busy0 if now is not None and self.busy0 is not None else None
        server = _pids_cpu(self.pids) - self.server0 if self.pids else None
        others = max(0.0, busy - client_cpu - (server or 0.0)) if busy is not None else None
        return {"wall_s": wall, "machine_busy_cpu_s": busy, "server_cpu_s": server, "server_pids": self.pids,
                "others_cpu_s": others, "others_core_share": others / (wall * self.cores) if others is not None else None,
                "cores": self.cores, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
