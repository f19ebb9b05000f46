"""Pulling from the Hugging Face hub (or, offline, from the local HF cache).

Everything goes through huggingface_hub, which honours HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE; these are read at call time, so a changed environment applies to the next
pull. The listing (model_info with file metadata) gives each file's size and LFS sha256, the
resolve URL's HEAD its final location, and `download` the bytes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from localserve.store.download import RemoteFile, is_network_error
from localserve.store.ingest import PullOptions, fetch_and_register, import_file, import_folder, log
from localserve.store.manifest import Manifest
from localserve.store.names import StoreName, parse_name, quant_from_filename
from localserve.store.sources import PullRef, hf_folder_files, select_gguf
from localserve.store.store import ModelStore, StoreError


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> str:
    """The local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub), read at call time."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def offline_mode() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or constants.is_offline_mode()


def pull_hf(store: ModelStore, src: PullRef, opts: PullOptions) -> Manifest:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub import errors as hf_errors

    repo = src.target
    if offline_mode():
        return _pull_hf_cache(store, src, opts)
    endpoint = hub_endpoint()
    token = get_token()  # HF_TOKEN, else the token `hf auth login` saved
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=opts.revision, files_metadata=True)
    except hf_errors.GatedRepoError:
        raise StoreError(f"{repo} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise StoreError(f"repository {repo} not found on {endpoint} (private? set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise StoreError(f"{repo} has no revision {opts.revision!r}") from None
    except hf_errors.HfHubHTTPError as e:
        raise StoreError(f"{endpoint}: cannot list {repo}: {e}".splitlines()[0]) from None
    except Exception as e:
        if not is_network_error(e):
            raise
        raise StoreError(f"cannot reach {endpoint} ({type(e).__name__}: {e}); no network?") from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    commit = info.sha or opts.revision or "main"
    chosen = select_gguf(repo, list(siblings), src.selector)
    files = [chosen] if chosen else hf_folder_files(list(siblings))
    if not files:
        raise StoreError(f"{repo} holds no GGUF file and no HF safetensors model (config.json + *.safetensors)")
    fmt = "gguf" if chosen else "hf"
    name = _target_name(opts, repo, chosen, src.selector)
    log(opts, f"pulling {repo}@{commit[:12]} -> {name}: {', '.join(files)}")
    remotes = [_remote_file(repo, commit, siblings[f], endpoint, token) for f in files]
    return fetch_and_register(store, remotes, fmt, name, f"hf://{repo}@{commit}", opts)


def _remote_file(repo: str, commit: str, sibling, endpoint: str, token: str | None) -> RemoteFile:
    """The resolve URL's metadata (HEAD, as hf_hub_download does): size, etag (the sha256 of
    an LFS file) and the final location; auth goes only to the hub itself, not to a CDN."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub import errors as hf_errors

    fname = sibling.rfilename
    url = hf_hub_url(repo, fname, revision=commit, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except hf_errors.EntryNotFoundError:
        raise StoreError(f"{repo} has no file {fname!r} at {commit[:12]}") from None
    except hf_errors.HfHubHTTPError as e:
        raise StoreError(f"{url}: {e}".splitlines()[0]) from None
    sha = sibling.lfs.sha256 if sibling.lfs else None
    if sha is None and meta.etag and re.fullmatch(r"[0-9a-f]{64}", meta.etag):
        sha = meta.etag  # an LFS file's etag is its sha256
    same_host = urlparse(meta.location).netloc in ("", urlparse(endpoint).netloc)
    headers = {"authorization": f"Bearer {token}"} if token and same_host else {}
    git_sha1 = None if sibling.lfs else sibling.blob_id
    return RemoteFile(meta.location or url, fname, meta.size or sibling.size, sha, headers, git_sha1)


def _pull_hf_cache(store: ModelStore, src: PullRef, opts: PullOptions) -> Manifest:
    """Offline (HF_HUB_OFFLINE): the repo's snapshot in the local HF cache, if there is one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        folder = Path(
            snapshot_download(src.target, revision=opts.revision, cache_dir=hub_cache_dir(), local_files_only=True)
        )
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, FileNotFoundError, ValueError):
        raise StoreError(
            f"offline mode (HF_HUB_OFFLINE) and {src.target} is not in the local Hugging Face cache"
        ) from None
    present = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    try:
        chosen = select_gguf(src.target, present, src.selector)
    except StoreError as e:
        raise StoreError(f"{e} (offline mode: only the files in the local Hugging Face cache count)") from None
    name = _target_name(opts, src.target, chosen, src.selector)
    if chosen:
        return import_file(store, folder / chosen, name, f"hf-cache://{src.target}/{chosen}", opts)
    return import_folder(store, folder, name, f"hf-cache://{src.target}", opts)


def _target_name(opts: PullOptions, repo: str, chosen: str | None, selector: str | None) -> StoreName:
    if opts.name:
        return parse_name(opts.name)
    tag = (quant_from_filename(chosen) if chosen else None) or "latest"
    return parse_name(f"{repo}:{tag}")
