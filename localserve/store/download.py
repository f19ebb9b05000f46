"""One file over HTTP into the store's partial/ directory, resumable, through huggingface_hub.

A download lands in `partial/<key>.part`, where `key` names the content (its sha256 when
known), so a later pull of the same file continues where an interrupted one stopped
(an HTTP Range request). huggingface_hub's `http_get` streams it, retrying transient
network errors with Range from the bytes it already has. Failures that make the partial
file useless (a 4xx, a size or hash mismatch) delete it; transient ones keep it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from localserve.store.disk import check_free_space
from localserve.store.progress import ProgressBar, ProgressCallback
from localserve.store.store import StoreError, sha256_file


class DownloadError(StoreError):
    pass


@dataclass(slots=True)
class RemoteFile:
    url: str
    display_name: str
    size: int | None
    sha256: str | None
    headers: dict[str, str]
    git_sha1: str | None = None  # git blob id of a small non-LFS hub file

    def partial_key(self) -> str:
        if self.sha256:
            return f"sha256-{self.sha256}.part"
        # no content hash: the URL and size name the content as well as we can
        digest = hashlib.sha256(f"{self.url}\0{self.size}".encode()).hexdigest()[:32]
        return f"url-{digest}.part"


def download(
    remote: RemoteFile,
    dest: Path,
    on_progress: ProgressCallback | None = None,
    show_progress: bool = True,
) -> str:
    """Downloads `remote` to `dest` (resuming what is there) and returns its sha256, checked
    against `remote.sha256` when that is known."""
    bar = partial(ProgressBar, on_update=on_progress, enabled=show_progress)
    with open(dest, "ab") as f:
        try:  # one writer per partial file: a second pull of the same file must not interleave
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"{remote.display_name} is being downloaded by another pull right now") from None
        have = f.tell()
        if remote.size is not None and have > remote.size:
            f.truncate(0)
            have = 0
        if remote.size is not None:
            try:
                check_free_space(dest.parent, remote.size - have)
            except StoreError:
                if have == 0:
                    dest.unlink()
                raise
        _http_get(remote, f, have, bar, dest)
    sha = sha256_file(dest)
    if remote.git_sha1 and git_blob_sha1(dest) != remote.git_sha1:
        dest.unlink(missing_ok=True)
        raise DownloadError(f"{remote.display_name}: git blob id mismatch; the download was corrupt and nothing was stored")
    if remote.sha256 and sha != remote.sha256:
        dest.unlink(missing_ok=True)
        raise DownloadError(
            f"{remote.display_name}: sha256 mismatch (expected {remote.sha256}, got {sha}); "
            "the download was corrupt and nothing was stored"
        )
    return sha


def _http_get(remote: RemoteFile, f, have: int, bar, dest: Path) -> None:
    """huggingface_hub's streaming GET (Range from `have`), its errors as DownloadError."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    try:
        http_get(
            remote.url,
            f,
            resume_size=have,
            headers=remote.headers,
            expected_size=remote.size,
            displayed_filename=remote.display_name,
            tqdm_class=bar,
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is not None and 400 <= status < 500:
            dest.unlink(missing_ok=True)  # the file is gone or forbidden: its bytes are useless
        raise DownloadError(f"download of {remote.display_name} failed: HTTP {status or '?'} ({_first_line(e)})") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            dest.unlink(missing_ok=True)
            raise DownloadError(f"disk full while downloading {remote.display_name}; nothing was stored") from None
        if "Consistency check failed" in str(e):
            dest.unlink(missing_ok=True)
            raise DownloadError(f"download of {remote.display_name} ended at the wrong size; nothing was stored") from None
        raise DownloadError(f"download of {remote.display_name} failed: {e} (run pull again to resume)") from None
    except Exception as e:  # transport errors after huggingface_hub's own retries
        if not is_network_error(e):
            raise
        raise DownloadError(
            f"download of {remote.display_name} failed: {type(e).__name__}: {e} (run pull again to resume)"
        ) from None


def is_network_error(e: BaseException) -> bool:
    """A transport failure of huggingface_hub's HTTP client (connect, timeout, protocol)."""
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
