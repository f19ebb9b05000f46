"""The model store on disk: content-addressed blobs plus one JSON manifest per `name:tag`.

    <root>/blobs/sha256-<hex>                  file bytes, named by their sha256
    <root>/manifests/<name parts>/<tag>.json   a Manifest
    <root>/partial/                            downloads and conversions in progress
    <root>/models/<name parts>/<tag>/          HF folders as hard links to blobs (built on demand)

Invariants: a blob is only ever created by an atomic rename of a verified file from
`partial/` (same filesystem); a manifest is written (atomically) only after all its blobs
exist; a blob no manifest names is garbage and `gc` removes it. Writers hold `lock()` so a
concurrent `rm` cannot collect a blob between its rename and its manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from localserve.paths import data_dir
from localserve.store.manifest import Manifest
from localserve.store.names import StoreName, parse_name

_CHUNK = 8 << 20


class StoreError(Exception):
    """A store operation that cannot go ahead; the message is for the user."""


class ModelNotInStoreError(StoreError):
    pass


def sha256_file(path: Path, on_bytes=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


class ModelStore:
    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else data_dir() / "store"
        for sub in ("blobs", "manifests", "partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        assert len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256), sha256
        return self.root / "blobs" / f"sha256-{sha256}"

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def partial_path(self, key: str) -> Path:
        return self.root / "partial" / key

    def add_blob(self, src: Path, sha256: str) -> Path:
        """Moves a verified file from partial/ into blobs/ (atomic). A blob that already
        exists wins: same name, same bytes."""
        dst = self.blob_path(sha256)
        if dst.exists():
            src.unlink(missing_ok=True)
        else:
            os.chmod(src, 0o444)
            os.replace(src, dst)
        return dst

    def link_blob(self, path: Path, sha256: str) -> bool:
        """Makes `path` (already hashed) a blob by hard link; False where links are impossible."""
        dst = self.blob_path(sha256)
        if dst.exists():
            return True
        try:
            os.link(path, dst)
            return True
        except OSError:
            return False

    # -- manifests -----------------------------------------------------------------------

    def manifest_path(self, name: StoreName) -> Path:
        return self.root.joinpath("manifests", *name.parts, f"{name.tag}.json")

    def write_manifest(self, m: Manifest) -> Path:
        for f in m.files:
            assert f.external is not None or self.has_blob(f.sha256), f"blob {f.sha256} missing"
        name = StoreName(m.name, m.tag)
        replaced = self.get(name)
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(m.to_json())
        os.replace(tmp, path)
        if replaced is not None and replaced.format == "hf":
            # its folder of hard links would keep the old blobs' bytes on disk after gc
            shutil.rmtree(self._folder_dir(replaced), ignore_errors=True)
        if replaced is not None and replaced.digests - m.digests:
            self._gc_locked()  # callers hold lock(): the old version's blobs may be garbage now
        return path

    def get(self, name: StoreName) -> Manifest | None:
        path = self.manifest_path(name)
        try:
            return Manifest.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as e:
            raise StoreError(f"corrupt manifest {path}: {e}") from None

    def list(self) -> list[Manifest]:
        out = []
        for path in sorted((self.root / "manifests").rglob("*.json")):
            try:
                out.append(Manifest.from_json(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # a foreign or half-written file is not a model
        return sorted(out, key=lambda m: m.ref)

    def lookup(self, ref: str) -> Manifest:
        """`name:tag`; a bare `name` means its `latest` tag, or its only tag."""
        sn = parse_name(ref, default_tag=None)
        if sn.tag:
            m = self.get(sn)
        else:
            m = self.get(StoreName(sn.name, "latest"))
            if m is None:
                tags = [x for x in self.list() if x.name == sn.name]
                if len(tags) > 1:
                    raise StoreError(
                        f"{sn.name} has several tags, name one: {', '.join(x.ref for x in tags)}"
                    )
                m = tags[0] if tags else None
        if m is None:
            hint = f"`localserve pull {ref}`" if "/" in sn.name else "`localserve ls`, `localserve pull`"
            raise ModelNotInStoreError(f"model {ref!r} is not in the store (try {hint})")
        return m

    def remove(self, ref: str) -> tuple[Manifest, int]:
        """Deletes a manifest and the blobs nothing else names; (manifest, bytes freed)."""
        with self.lock():
            m = self.lookup(ref)
            path = self.manifest_path(StoreName(m.name, m.tag))
            path.unlink()
            with contextlib.suppress(OSError):  # drop now-empty name directories
                parent = path.parent
                while parent != self.root / "manifests":
                    parent.rmdir()
                    parent = parent.parent
            shutil.rmtree(self._folder_dir(m), ignore_errors=True)
            return m, self._gc_locked()

    def gc(self) -> int:
        with self.lock():
            return self._gc_locked()

    def _gc_locked(self) -> int:
        live = set().union(*(m.digests for m in self.list()))
        freed = 0
        for blob in (self.root / "blobs").iterdir():
            if blob.name.removeprefix("sha256-") not in live:
                freed += blob.stat().st_size
                blob.unlink()
        return freed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- paths the loaders take ------------------------------------------------------------

    def model_path(self, m: Manifest) -> Path:
        """A .gguf file, or a folder of hard links for an HF model."""
        if m.format == "gguf":
            (f,) = m.files
            path = Path(f.external) if f.external else self.blob_path(f.sha256)
            if not path.is_file():
                raise StoreError(f"{m.ref}: its file {path} is missing (pull it again)")
            return path
        folder = self._folder_dir(m)
        wanted = {f.path for f in m.files}
        if folder.is_dir():  # files of an earlier version under this name would mislead the loader
            for p in folder.rglob("*"):
                if (p.is_file() or p.is_symlink()) and str(p.relative_to(folder)) not in wanted:
                    p.unlink()
        for f in m.files:
            dst = folder / f.path
            src = Path(f.external) if f.external else self.blob_path(f.sha256)
            if not src.is_file():
                raise StoreError(f"{m.ref}: its file {src} is missing (pull it again)")
            if dst.exists() and os.path.samefile(src, dst):
                continue
            dst.unlink(missing_ok=True)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                os.symlink(src, dst)
        return folder

    def _folder_dir(self, m: Manifest) -> Path:
        return self.root.joinpath("models", *m.name.split("/"), m.tag)
