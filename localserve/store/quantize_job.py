"""A quantization into the store: resolve the source, convert into partial/, hash, register.

The store only changes at the end (blob rename + manifest under the lock); a failure or an
unsupported target leaves it as it was.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from localserve.errors import ModelLoadError
from localserve.store.manifest import Manifest, ManifestFile
from localserve.store.model_info import summarize_gguf
from localserve.store.names import clean_part, is_store_name, parse_name, split_stem
from localserve.store.ingest import build_manifest
from localserve.store.quantize import ConvertResult, check_target, quantize_gguf
from localserve.store.store import ModelStore, StoreError, sha256_file


@dataclass(slots=True)
class QuantizeOutcome:
    manifest: Manifest
    result: ConvertResult
    source_path: Path  # the file or folder converted


def resolve_source(store: ModelStore, src: str) -> tuple[Path, str]:
    """(path, base name for the output) of a store name, a .gguf file or an HF folder."""
    path = Path(src).expanduser()
    if path.exists():
        base = clean_part(path.name) if path.is_dir() else split_stem(path.name)[0]
        return path, f"{base}:{{tag}}"
    if is_store_name(src):
        m = store.lookup(src)
        return store.model_path(m), f"{m.name}:{m.tag}-{{tag}}"
    raise StoreError(f"no such model, file or folder: {src}")


def quantize_to_store(
    store: ModelStore,
    src: str,
    target: str,
    name: str | None = None,
    on_values: Callable[[int], None] | None = None,
) -> QuantizeOutcome:
    path, pattern = resolve_source(store, src)
    hf = path.is_dir()
    target = check_target(target, hf=hf)
    out_name = parse_name(name) if name else parse_name(pattern.format(tag=target))
    tmp = store.partial_path(f"quantize-{os.getpid()}-{out_name.tag}.gguf")
    try:
        try:
            if hf:
                from localserve.store.hf_to_gguf import convert_hf_folder

                result = convert_hf_folder(path, tmp, target, on_values)
            else:
                result = quantize_gguf(path, tmp, target, on_values)
        except ModelLoadError as e:
            raise StoreError(f"cannot convert {src}: {e.reason}") from None
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise StoreError(f"disk full while writing the {target} file; nothing was stored") from None
        sha = sha256_file(tmp)
        summary = summarize_gguf(tmp)
        with store.lock():
            size = tmp.stat().st_size
            blob = store.add_blob(tmp, sha)
            m = build_manifest(out_name, "gguf", [ManifestFile("model.gguf", sha, size)], summary, f"quantize:{src}")
            m.extra["quantized_from"] = src
            store.write_manifest(m)
        result.path = blob
        return QuantizeOutcome(m, result, path)
    finally:
        tmp.unlink(missing_ok=True)
