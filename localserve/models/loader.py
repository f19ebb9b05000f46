"""One entry point for every model reference: `random:NAME`, a .gguf file or an HF folder."""

from __future__ import annotations

import os
from pathlib import Path

from localserve.errors import ModelLoadError
from localserve.models.gguf_file import GGUF_MAGIC
from localserve.models.weights import LoadedWeights

RANDOM_PREFIX = "random:"


def load_weights(ref: str | os.PathLike) -> LoadedWeights:
    ref = str(ref)
    if ref.startswith(RANDOM_PREFIX):
        from localserve.models.presets import load_preset

        return load_preset(ref[len(RANDOM_PREFIX) :])
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(ref, "folder has no config.json (expected a Hugging Face model folder)")
        from localserve.models.hf_loader import load_hf_folder

        return load_hf_folder(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            from localserve.models.gguf_loader import load_gguf

            return load_gguf(path)
        raise ModelLoadError(ref, "not a GGUF file (bad magic) and not a Hugging Face folder")
    raise ModelLoadError(
        ref, "no such file or folder (expected a .gguf file, an HF folder or random:<preset>)"
    )


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
