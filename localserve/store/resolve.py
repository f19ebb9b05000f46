"""Store names to the paths the loaders take (what the runtime calls for `gemma3:270m`)."""

from __future__ import annotations

from pathlib import Path

from localserve.store.names import is_store_name
from localserve.store.store import ModelStore


def resolve_store_path(ref: str, store: ModelStore | None = None) -> Path | None:
    """The .gguf file or HF folder `ref` names in the store; None when `ref` is no store name.
    Raises ModelNotInStoreError for a well-formed name the store does not hold."""
    if not is_store_name(ref):
        return None
    store = store or ModelStore()
    return store.model_path(store.lookup(ref))
