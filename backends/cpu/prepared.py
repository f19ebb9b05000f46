"""Prepared weights: the Q8 codes and scales the CPU backend quantizes a model's layers to, kept
on disk after the first load so that later starts read them instead of dequantizing the file's
tensors and quantizing them again (about 3 s of a cold start of the default model on 2 cores).

One safetensors file per (model file, size, modification time, weight format, layout version)
under `cache/prepared/`; a changed model file is a new key, and a file that cannot be read is
rebuilt. LOCALSERVE_PREPARED_CACHE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from localserve import envs
from localserve.paths import cache_dir

log = logging.getLogger(__name__)

LAYOUT = "q8codes-1"  # bump when Q8KernelLinear.quantize changes what it returns


class PreparedCodes:
    """Codes by layer name: what the file held (get) and what this load quantized (put, saved
    by save() when the file was missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.found: dict[str, torch.Tensor] = {}
        self.new: dict[str, torch.Tensor] = {}
        if path.exists():
            try:
                from safetensors.torch import load_file

                self.found = load_file(str(path))
            except Exception as exc:  # a torn or foreign file: rebuilt below
                log.warning("prepared weights %s unreadable (%s); rebuilding them", path, exc)
                self.found = {}

    @classmethod
    def for_model(cls, source: str, weight_format: str) -> "PreparedCodes | None":
        """The store for a model file, or None (a folder, a random: model, or turned off)."""
        path = Path(source)
        if not envs.PREPARED_CACHE.get() or source.startswith("random:") or not path.is_file():
            return None
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{weight_format}|{LAYOUT}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return cls(cache_dir() / "prepared" / f"{path.stem}-{digest}.safetensors")

    def get(self, name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The codes of a layer of `shape` (out, in), or None when missing or not of that shape."""
        q, d = self.found.get(name + ":q"), self.found.get(name + ":d")
        if q is None or d is None or q.dtype != torch.int8 or d.dtype != torch.float32:
            return None
        n, k = shape
        return (q, d) if tuple(q.shape) == (n, k) and tuple(d.shape) == (n, k // 32) else None

    def put(self, name: str, q: torch.Tensor, d: torch.Tensor) -> None:
        self.new[name + ":q"], self.new[name + ":d"] = q.contiguous(), d.contiguous()

    def save(self) -> None:
        """Writes what this load quantized, if anything, atomically; a failure only logs."""
        if not self.new:
            return
        from safetensors.torch import save_file

        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file({**self.found, **self.new}, str(tmp))
            os.replace(tmp, self.path)
        except Exception as exc:  # OSError, or safetensors' own error for a full disk
            log.warning("could not keep prepared weights in %s: %s", self.path, exc)
            tmp.unlink(missing_ok=True)
        self.new = {}
