"""A validated, memory-mapped view of one GGUF file.

The header is parsed here rather than with `gguf.GGUFReader`: the reader builds a numpy view
per array element and takes ~10 s on the default model's 262144-token vocabulary, and it
happily "opens" truncated files because the data is only mmapped. This parser reads the
same format (v2/v3, little-endian) in well under a second and checks every byte range
against the file size at open time, so a damaged file fails with `ModelLoadError` naming it
rather than with a crash deep inside a backend.

Tensor data stay in the mmap: `tensor()` hands out zero-copy views.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from localserve.errors import ModelLoadError
from localserve.models.weights import GGMLTensor

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# far above any real file; guards against a corrupt count making us loop for hours
_MAX_COUNT = 1 << 24
_MAX_DIMS = 4

# GGUF value types -> struct format of one scalar
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


@dataclass(slots=True, frozen=True)
class TensorInfo:
    name: str
    ggml_type: str  # GGMLQuantizationType name: "F32", "Q8_0", ...
    shape: tuple[int, ...]  # numpy order: reversed GGUF ne
    offset: int  # absolute byte offset in the file
    n_bytes: int


class _Truncated(Exception):
    pass


class _Cursor:
    """Sequential little-endian reads over a buffer; every read is bounds-checked."""

    __slots__ = ("buf", "pos", "size")

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated(f"header ends early at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def count(self, what: str) -> int:
        n = self.take("<Q")
        if n > _MAX_COUNT:
            raise ValueError(f"implausible {what} {n} at byte {self.pos - 8}")
        return n

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise _Truncated(f"string of {n} bytes at byte {self.pos - 8} runs past the end")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == 6:  # f32: the shortest decimal that round-trips (1e-06, not 9.9999997e-07)
            return float(str(np.float32(self.take("<f"))))
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.take("<I")
            n = self.count("array length")
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype])
                end = self.pos + n * dtype.itemsize
                if end > self.size:
                    raise _Truncated(f"array at byte {self.pos} runs past the end")
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
                self.pos = end
                out = arr.tolist()
                return [bool(v) for v in out] if etype == 7 else out
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos - 4}")


class GGUFFile:
    """Metadata (plain Python values) and tensor directory of a GGUF file, opened read-only.

    Raises ModelLoadError at construction for anything that is not a complete, well-formed
    GGUF v2/v3 file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._mm = self._map()
        try:
            self.version, self.metadata, self.tensor_infos, self.data_offset = self._parse()
        except _Truncated as e:
            self._fail(f"truncated or corrupt GGUF header ({e})")
        except (ValueError, struct.error, OverflowError, MemoryError) as e:
            self._fail(f"corrupt GGUF header ({e})")
        self._check_tensor_ranges()
        self._data = np.frombuffer(self._mm, dtype=np.uint8)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor(self, name: str) -> np.ndarray | GGMLTensor:
        """F32 tensors as read-only float32 numpy views; every other type as GGMLTensor."""
        info = self.tensor_infos[name]
        raw = self._data[info.offset : info.offset + info.n_bytes]
        if info.ggml_type == "F32":
            return raw.view(np.float32).reshape(info.shape)
        rows = prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        return GGMLTensor(info.ggml_type, raw.reshape(rows, -1), info.shape)

    def close(self) -> None:
        """Drops this object's mapping; views already handed out keep theirs alive."""
        self._data = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:  # exported views still reference it: the OS unmaps on their release
            pass

    # -- parsing -------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        raise ModelLoadError(self.path, reason)

    def _map(self) -> mmap.mmap:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    self._fail(f"not a GGUF file (only {size} bytes)")
                if f.read(4) != GGUF_MAGIC:
                    self._fail("not a GGUF file (bad magic)")
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            self._fail(f"cannot read file ({e.strerror or e})")
        raise AssertionError("unreachable")

    def _parse(self) -> tuple[int, dict[str, Any], dict[str, TensorInfo], int]:
        cur = _Cursor(self._mm)
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
            raise ValueError(f"unsupported GGUF version {version}{hint}")
        n_tensors = cur.count("tensor count")
        n_kv = cur.count("metadata count")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.take("<I"))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"bad general.alignment {alignment!r}")
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            ne = [cur.take("<Q") for _ in range(n_dims)]
            type_id = cur.take("<I")
            raw_infos.append((name, ne, type_id, cur.take("<Q")))
        data_offset = -(-cur.pos // alignment) * alignment
        infos: dict[str, TensorInfo] = {}
        for name, ne, type_id, rel in raw_infos:
            if name in infos:
                raise ValueError(f"tensor {name!r} appears twice")
            infos[name] = self._tensor_info(name, ne, type_id, data_offset + rel, alignment, rel)
        return version, metadata, infos, data_offset

    @staticmethod
    def _tensor_info(
        name: str, ne: list[int], type_id: int, offset: int, alignment: int, rel: int
    ) -> TensorInfo:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown GGML type {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if ne[0] % block_size:
            raise ValueError(f"tensor {name!r}: row length {ne[0]} is not a multiple of {qtype.name} blocks")
        if rel % alignment:
            raise ValueError(f"tensor {name!r}: data offset {rel} is not {alignment}-aligned")
        n_bytes = prod(ne) // block_size * type_size
        return TensorInfo(name, qtype.name, tuple(reversed(ne)), offset, n_bytes)

    def _check_tensor_ranges(self) -> None:
        size = len(self._mm)
        for info in self.tensor_infos.values():
            end = info.offset + info.n_bytes
            if end > size:
                self._fail(
                    f"truncated: tensor {info.name} needs bytes {info.offset}..{end} "
                    f"but the file has {size} bytes"
                )


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
