"""Helpers of the store tests."""

from __future__ import annotations

from pathlib import Path


def store_state(store) -> tuple[list[str], list[str]]:
    """(manifest files, blob names): what "the store is unchanged" compares."""
    root = Path(store.root)
    manifests = sorted(str(p.relative_to(root)) for p in (root / "manifests").rglob("*.json"))
    blobs = sorted(p.name for p in (root / "blobs").iterdir())
    return manifests, blobs
