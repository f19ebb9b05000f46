"""GPU discovery and memory accounting for the torch GPU backends (CUDA and ROCm builds of torch).

Discovery never raises: a machine without a usable GPU gets an empty probe and one logged
reason (no torch, a CPU-only torch, a driver too old for the toolkit, ...), so `auto` moves on
to the next backend instead of failing at the first request.
"""

from __future__ import annotations

import logging
import warnings

log = logging.getLogger("localserve.backends.gpu")

GiB = 1 << 30


def gpu_unavailable_reason(platform: str) -> str | None:
    """None if torch sees a GPU of `platform` ("cuda" or "rocm"), else why not."""
    try:
        import torch
    except Exception as exc:
        return f"torch cannot be imported: {exc}"
    is_hip = getattr(torch.version, "hip", None) is not None
    if platform == "cuda" and is_hip:
        return "this torch is a ROCm build (use the rocm backend)"
    if platform == "rocm" and not is_hip:
        return "this torch is not a ROCm build (torch.version.hip is None)"
    if platform == "cuda" and torch.version.cuda is None:
        return "this torch is a CPU-only build (install a CUDA wheel of torch)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
        except Exception as exc:  # a broken driver can raise here
            return f"the GPU driver failed to initialise: {exc}"
    if not ok:
        # torch explains a driver/toolkit mismatch in a warning: pass it on
        detail = "; ".join(str(w.message).strip() for w in caught)
        return "no GPU visible to torch" + (f" ({detail})" if detail else "")
    return None


def device_infos(backend: str):
    """DeviceInfo per visible GPU (empty when none; the reason is logged once)."""
    from localserve.engine.backend import DeviceInfo

    reason = gpu_unavailable_reason(backend)
    if reason is not None:
        _log_once(f"{backend} backend unavailable: {reason}")
        return []
    import torch

    infos = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        infos.append(DeviceInfo(backend=backend, name=props.name, memory_bytes=props.total_memory,
                                index=i))
    return infos


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    # info, not a warning: `auto` probes every backend, and a CPU machine without a GPU is normal
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def memory_report(device) -> tuple[int, int]:
    """(free, total) bytes on `device` as the driver sees them (other processes included)."""
    import torch

    if torch.device(device).type == "cpu":
        from localserve.backends.cpu.host import available_ram_bytes, total_ram_bytes

        return available_ram_bytes(), total_ram_bytes()
    return torch.cuda.mem_get_info(device)


def out_of_memory_message(what: str, needed: int, free: int, total: int, hint: str) -> str:
    return (f"out of GPU memory {what}: it needs {needed / GiB:.2f} GiB but only "
            f"{free / GiB:.2f} GiB of the GPU's {total / GiB:.1f} GiB is free; {hint}")
