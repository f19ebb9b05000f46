"""The model store: content-addressed blobs + `name:tag` manifests, pull and quantize.

Framework-free (numpy, gguf, huggingface_hub); the CLI lives in `localserve.store.cli`.
Exports resolve lazily so `localserve --help` (which imports the CLI module) stays fast.
"""

from importlib import import_module

_EXPORTS = {
    "Manifest": "localserve.store.manifest",
    "ManifestFile": "localserve.store.manifest",
    "ModelNotInStoreError": "localserve.store.store",
    "ModelStore": "localserve.store.store",
    "StoreError": "localserve.store.store",
    "StoreName": "localserve.store.names",
    "is_store_name": "localserve.store.names",
    "parse_name": "localserve.store.names",
    "resolve_store_path": "localserve.store.resolve",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'localserve.store' has no attribute {name!r}")
