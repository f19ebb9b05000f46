"""A GGUF file's metadata with each value's GGUF type, so a rewritten file keeps them exactly.

`localserve.models.gguf_file` decodes values to plain Python and drops the types (uint32 vs
int64, f32 vs f64 all look alike afterwards); a converter needs them. Numeric arrays are read
with one numpy call each, so Gemma's 262k-entry score and type arrays cost milliseconds.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFValueType

_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(slots=True)
class KV:
    key: str
    type: GGUFValueType
    value: Any  # python scalar / str / list (arrays)
    sub_type: GGUFValueType | None = None  # element type of an ARRAY


def read_kvs(path: str | os.PathLike) -> list[KV]:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _Reader(mm).kvs()
    finally:
        mm.close()


class _Reader:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str | bytes:
        n = self.take("<Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:  # kept as bytes: the writer copies them unchanged
            return raw

    def kvs(self) -> list[KV]:
        assert self.buf[:4] == b"GGUF", "not a GGUF file"
        self.pos = 4
        version = self.take("<I")
        assert version in (2, 3), f"GGUF version {version}"
        self.take("<Q")  # tensor count
        n_kv = self.take("<Q")
        out = []
        for _ in range(n_kv):
            key = self.string()
            vtype = GGUFValueType(self.take("<I"))
            if vtype == GGUFValueType.ARRAY:
                sub = GGUFValueType(self.take("<I"))
                n = self.take("<Q")
                out.append(KV(key, vtype, self.array(sub, n), sub))
            else:
                out.append(KV(key, vtype, self.scalar(vtype)))
        return out

    def scalar(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        return self.take(_SCALAR_FMT[vtype])

    def array(self, sub: GGUFValueType, n: int) -> list:
        if sub in _SCALAR_FMT:
            dtype = np.dtype(_SCALAR_FMT[sub])
            arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
            self.pos += n * dtype.itemsize
            return arr.tolist()
        return [self.scalar(sub) for _ in range(n)]
