"""The free-disk check every write into the store passes before it starts.

A write needs its own size plus a reserve left free for everything else on the disk:
LOCALSERVE_DISK_RESERVE (bytes, or with a K/M/G/T suffix; default 64M). A huge reserve
makes any write look like it hits a full disk, which is how the tests simulate one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from localserve import envs
from localserve.store.progress import format_bytes
from localserve.store.store import StoreError

DEFAULT_RESERVE = envs.DISK_RESERVE.default_value


class DiskFullError(StoreError):
    pass


def disk_reserve() -> int:
    try:
        return envs.DISK_RESERVE.get()
    except envs.EnvError as exc:
        raise StoreError(str(exc)) from None


def check_free_space(directory: Path, need: int) -> None:
    """Raises DiskFullError unless `need` bytes fit in `directory` with the reserve left over."""
    free = shutil.disk_usage(directory).free
    reserve = disk_reserve()
    if need + reserve > free:
        kept = f" and {format_bytes(reserve)} kept free" if reserve else ""
        raise DiskFullError(
            f"not enough disk space in {directory}: this needs {format_bytes(need)}{kept}, "
            f"{format_bytes(free)} free; nothing was stored"
        )
