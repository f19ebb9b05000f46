"""`pull`: a Hugging Face repo, a URL or a local path into the store (see sources.py for
the reference syntax, hub.py for the hub, ingest.py for how bytes become blobs)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from localserve.store.download import RemoteFile, is_network_error
from localserve.store.hub import pull_hf
from localserve.store.ingest import PullOptions, fetch_and_register, import_file, import_folder
from localserve.store.manifest import Manifest
from localserve.store.names import clean_part, parse_name, split_stem
from localserve.store.sources import PullRef, parse_pull_ref
from localserve.store.store import ModelStore, StoreError

__all__ = ["PullOptions", "pull"]


def pull(ref: str, store: ModelStore | None = None, opts: PullOptions | None = None) -> Manifest:
    store = store or ModelStore()
    opts = opts or PullOptions()
    src = parse_pull_ref(ref)
    if src.kind == "path":
        return _pull_path(store, Path(src.target), opts)
    if src.kind == "url":
        return _pull_url(store, src, opts)
    return pull_hf(store, src, opts)


def _pull_url(store: ModelStore, src: PullRef, opts: PullOptions) -> Manifest:
    from huggingface_hub.utils import get_session

    fname = Path(urlparse(src.target).path).name or "model.gguf"
    size = None
    try:
        head = get_session().head(src.target, follow_redirects=True, timeout=30)
        if head.status_code == 404:
            raise StoreError(f"{src.target}: not found (HTTP 404)")
        if head.status_code < 400 and head.headers.get("Content-Length"):
            size = int(head.headers["Content-Length"])
    except Exception as e:
        if not is_network_error(e):
            raise
        raise StoreError(f"cannot reach {src.target} ({type(e).__name__}: {e})") from None
    stem, quant = split_stem(fname)
    name = parse_name(opts.name) if opts.name else parse_name(f"{stem}:{quant or 'latest'}")
    remote = RemoteFile(src.target, fname, size, src.sha256, {})
    return fetch_and_register(store, [remote], "gguf", name, src.target, opts)


def _pull_path(store: ModelStore, path: Path, opts: PullOptions) -> Manifest:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StoreError(f"{path}: a folder must be a Hugging Face model folder (config.json + *.safetensors)")
        name = parse_name(opts.name) if opts.name else parse_name(f"{clean_part(path.name)}:latest")
        return import_folder(store, path, name, str(path), opts)
    stem, quant = split_stem(path.name)
    name = parse_name(opts.name) if opts.name else parse_name(f"{stem}:{quant or 'latest'}")
    return import_file(store, path, name, str(path), opts)
