"""Backend registry: backends are found through the `localserve.backends` entry points and
imported lazily, so a machine without jax, mlx or flashinfer still runs."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

# `auto` tries these in order and takes the first whose probe() finds a device
AUTO_ORDER = ("cuda", "rocm", "mlx", "tpu", "cpu")

_BUILTIN = {
    "cpu": "localserve.backends.cpu:CPUBackend",
    "cuda": "localserve.backends.cuda:CUDABackend",
    "rocm": "localserve.backends.rocm:ROCmBackend",
}


class BackendUnavailableError(RuntimeError):
    pass


def available_backends() -> dict[str, str]:
    found = dict(_BUILTIN)
    for ep in entry_points(group="localserve.backends"):
        found[ep.name] = ep.value
    return found


def load_backend_class(name: str):
    target = available_backends().get(name)
    if target is None:
        raise BackendUnavailableError(
            f"unknown backend {name!r} (known: {', '.join(sorted(available_backends()))})"
        )
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} cannot be imported here: {exc}") from exc


def select_backend(name: str = "auto"):
    """The backend class for `name`; `auto` picks the first usable one in AUTO_ORDER."""
    if name != "auto":
        cls = load_backend_class(name)
        if not cls.probe():
            raise BackendUnavailableError(f"backend {name!r} finds no usable device on this machine")
        return cls
    reasons = []
    for candidate in AUTO_ORDER:
        if candidate not in available_backends():
            continue
        try:
            cls = load_backend_class(candidate)
            if cls.probe():
                return cls
            reasons.append(f"{candidate}: no device")
        except BackendUnavailableError as exc:
            reasons.append(str(exc))
    raise BackendUnavailableError("no usable backend: " + "; ".join(reasons))
