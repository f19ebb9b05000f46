"""Timing helpers the GPU scripts share: `time_calls` (host seconds of wrapped calls) and
`kernel_table` (a torch profiler's CUDA kernels, by class). No GPU or localserve import here."""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def time_calls(targets, parts: dict[str, float], calls: dict[str, int]):
    """Inside the block each (owner, attr, key) of `targets` is wrapped: every call adds its
    seconds to parts[key] and one to calls[key]. Owners are instances or modules; what was
    there before is put back on exit."""
    saved = []
    for owner, attr, key in targets:
        f = getattr(owner, attr)
        saved.append((owner, attr, vars(owner).get(attr), attr in vars(owner)))
        parts.setdefault(key, 0.0)
        calls.setdefault(key, 0)

        def timed(*a, _f=f, _key=key, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                parts[_key] += time.perf_counter() - t
                calls[_key] += 1
        setattr(owner, attr, timed)
    try:
        yield
    finally:
        for owner, attr, orig, had in reversed(saved):
            if had:
                setattr(owner, attr, orig)
            else:
                delattr(owner, attr)  # the instance attribute hid the class's method


def kernel_table(prof, steps: int = 1, top: int = 12) -> dict:
    """A torch profiler's CUDA kernels per step: ms and launches per class (gemm, attention,
    fused triton, other) and the `top` kernels by time."""
    ms: dict[str, float] = {}
    count: dict[str, int] = {}
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if not t:
            continue
        name = ev.key.lower()
        cls = ("gemm" if any(k in name for k in ("gemm", "gemv", "cutlass", "sm90", "xmma",
                                                 "nvjet"))
               else "attention" if any(k in name for k in ("flashinfer", "prefill", "decode",
                                                           "merge", "attention"))
               else "fused triton" if name.startswith("_") and "kernel" in name
               else "other")
        ms[cls] = ms.get(cls, 0.0) + t / steps / 1e3
        count[cls] = count.get(cls, 0) + ev.count // steps
        rows.append((ev.key[:70], round(t / steps / 1e3, 4), ev.count))
    return {"ms": {k: round(v, 4) for k, v in ms.items()}, "count": count,
            "top": sorted(rows, key=lambda r: -r[1])[:top]}
