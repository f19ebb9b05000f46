"""Bytes into the store: whatever a pull fetched or a user pointed at becomes verified blobs
plus a manifest.

Every path ends the same way: bytes in partial/, sha256 checked, the file validated as a
whole GGUF (or HF folder), an atomic rename into blobs/ and then the manifest, under the
store lock. Any failure before the manifest leaves manifests and blobs as they were.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from localserve.errors import ModelLoadError
from localserve.models.config import SUPPORTED_ARCHITECTURES
from localserve.models.gguf_file import GGUFFile
from localserve.store.disk import check_free_space
from localserve.store.download import RemoteFile, download
from localserve.store.manifest import Manifest, ManifestFile
from localserve.store.model_info import ModelSummary, summarize_gguf, summarize_hf_folder
from localserve.store.names import StoreName, parse_name
from localserve.store.progress import ProgressBar, ProgressCallback
from localserve.store.sources import hf_folder_files
from localserve.store.store import ModelStore, StoreError, sha256_file

Log = Callable[[str], None]


@dataclass(slots=True)
class PullOptions:
    name: str | None = None  # store name[:tag] to register under (default: derived)
    revision: str | None = None
    on_progress: ProgressCallback | None = None
    show_progress: bool = True
    log: Log | None = None


def import_file(store: ModelStore, path: Path, name: StoreName, source: str, opts: PullOptions) -> Manifest:
    validate_gguf(path, str(path))
    check_free_space(store.root, path.stat().st_size)
    sha = sha256_file(path)
    tmp = store.partial_path(f"sha256-{sha}.copy{os.getpid()}")
    try:
        if not store.has_blob(sha):
            _copy(path, tmp, opts)
            if sha256_file(tmp) != sha:
                raise StoreError(f"{path} changed while it was copied; nothing was stored")
        summary = summarize_gguf(tmp if tmp.exists() else store.blob_path(sha))
        with store.lock():
            if tmp.exists():
                store.add_blob(tmp, sha)
            m = build_manifest(name, "gguf", [ManifestFile("model.gguf", sha, path.stat().st_size)], summary, source)
            store.write_manifest(m)
        return m
    finally:
        tmp.unlink(missing_ok=True)


def import_folder(store: ModelStore, folder: Path, name: StoreName, source: str, opts: PullOptions) -> Manifest:
    present = [str(p.relative_to(folder)) for p in folder.iterdir() if p.is_file()]
    files = hf_folder_files(present)
    if not files:
        raise StoreError(f"{folder}: no config.json + *.safetensors to import")
    try:
        summary = summarize_hf_folder(folder)
    except (ModelLoadError, ValueError, KeyError) as e:
        raise StoreError(f"{folder}: not a loadable HF model folder ({e})") from None
    check_free_space(store.root, sum((folder / f).stat().st_size for f in files))
    entries, tmps = [], []
    try:
        for f in files:
            sha = sha256_file(folder / f)
            if not store.has_blob(sha):
                tmp = store.partial_path(f"sha256-{sha}.copy{os.getpid()}")
                tmps.append((tmp, sha))
                _copy(folder / f, tmp, opts)
            entries.append(ManifestFile(f, sha, (folder / f).stat().st_size))
        with store.lock():
            for tmp, sha in tmps:
                store.add_blob(tmp, sha)
            m = build_manifest(name, "hf", entries, summary, source)
            store.write_manifest(m)
        return m
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)


def fetch_and_register(
    store: ModelStore, remotes: list[RemoteFile], fmt: str, name: StoreName, source: str, opts: PullOptions
) -> Manifest:
    need = sum(r.size or 0 for r in remotes if not (r.sha256 and store.has_blob(r.sha256)))
    check_free_space(store.root, need)
    entries: list[ManifestFile] = []
    fetched: list[tuple[Path, str]] = []
    for r in remotes:
        if r.sha256 and store.has_blob(r.sha256):
            log(opts, f"{r.display_name}: already in the store")
            entries.append(ManifestFile(r.display_name, r.sha256, store.blob_path(r.sha256).stat().st_size))
            continue
        dest = store.partial_path(r.partial_key())
        sha = download(r, dest, opts.on_progress, opts.show_progress)
        if fmt == "gguf":
            try:
                validate_gguf(dest, r.display_name)
            except StoreError:
                dest.unlink(missing_ok=True)
                raise
        fetched.append((dest, sha))
        entries.append(ManifestFile("model.gguf" if fmt == "gguf" else r.display_name, sha, dest.stat().st_size))
    try:
        with store.lock():
            for dest, sha in fetched:
                store.add_blob(dest, sha)
            m = build_manifest(name, fmt, entries, _summary(store, fmt, entries, name), source)
            store.write_manifest(m)
    except BaseException:
        store.gc()  # blobs renamed in before the failure are named by no manifest
        raise
    log(opts, f"stored {m.ref} ({m.quantization}, {m.architecture})")
    if m.architecture not in SUPPORTED_ARCHITECTURES:
        log(opts, f"note: the engine does not run {m.architecture!r} models yet "
                   f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return m


def _summary(store: ModelStore, fmt: str, entries: list[ManifestFile], name: StoreName) -> ModelSummary:
    if fmt == "gguf":
        return summarize_gguf(store.blob_path(entries[0].sha256))
    probe = Manifest(name.name, name.tag, "hf", entries)
    try:
        return summarize_hf_folder(store.model_path(probe))
    except (ModelLoadError, ValueError, KeyError) as e:
        raise StoreError(f"{name}: the downloaded folder is not a loadable HF model ({e})") from None


def build_manifest(
    name: StoreName, fmt: str, files: list[ManifestFile], summary: ModelSummary, source: str
) -> Manifest:
    return Manifest(
        name=name.name,
        tag=name.tag,
        format=fmt,
        files=files,
        architecture=summary.architecture,
        parameters=summary.parameters,
        quantization=summary.quantization,
        context=summary.context,
        source=source,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def register_local_gguf(store: ModelStore, path: Path, name: str, sha256: str, source: str) -> Manifest:
    """Registers a GGUF the store does not own a copy of (the embedded default): a hard link
    when the filesystem allows, else a reference to `path`. Idempotent."""
    sn = parse_name(name)
    existing = store.get(sn)
    if existing is not None and existing.files[0].sha256 == sha256:
        f = existing.files[0]
        if (Path(f.external) if f.external else store.blob_path(sha256)).is_file():
            return existing
    with store.lock():
        linked = store.link_blob(path, sha256)
        entry = ManifestFile("model.gguf", sha256, path.stat().st_size, None if linked else str(path))
        m = build_manifest(sn, "gguf", [entry], summarize_gguf(path), source)
        store.write_manifest(m)
    return m


def validate_gguf(path: Path, display: str) -> None:
    try:
        GGUFFile(path).close()
    except ModelLoadError as e:
        raise StoreError(f"{display}: not a usable GGUF file ({e.reason}); nothing was stored") from None


def _copy(src: Path, dst: Path, opts: PullOptions) -> None:
    total = src.stat().st_size
    with open(src, "rb") as fi, open(dst, "wb") as fo, ProgressBar(
        total, desc=src.name, on_update=opts.on_progress, enabled=opts.show_progress
    ) as bar:
        while chunk := fi.read(8 << 20):
            fo.write(chunk)
            bar.update(len(chunk))
    shutil.copystat(src, dst)


def log(opts: PullOptions, msg: str) -> None:
    if opts.log is not None:
        opts.log(msg)
