"""The free-disk check every write into the store passes before it starts.

A write needs its own size plus a reserve left free for everything else on the disk:
LOCALSERVE_DISK_RESERVE (bytes, or with a K/M/G/T suffix; default 64M). A huge reserve
makes any write look like it hits a full disk, which is how the tests simulate one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from localserve.store.progress import format_bytes
from localserve.store.store import StoreError

DEFAULT_RESERVE = 64 << 20
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class DiskFullError(StoreError):
    pass


def disk_reserve() -> int:
    text = os.environ.get("LOCALSERVE_DISK_RESERVE", "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return DEFAULT_RESERVE
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGTP]?)", text)
    if m is None:
        raise StoreError(f"LOCALSERVE_DISK_RESERVE={os.environ['LOCALSERVE_DISK_RESERVE']!r}: expected bytes, e.g. 512M or 2G")
    return int(float(m[1]) * _SUFFIX[m[2]])


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
