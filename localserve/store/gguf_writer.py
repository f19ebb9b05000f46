"""Writes a GGUF file one tensor chunk at a time, so converting a model never holds more than
a few million values in memory.

gguf-py's GGUFWriter writes the header, metadata and tensor directory; the data section is
written here in row chunks with the same offsets and padding the writer announced (each
tensor starts aligned; the writer's `ggml_pad` rule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np

from localserve.models.ggml_quants import row_bytes
from localserve.store.disk import check_free_space
from localserve.store.gguf_kv import KV

# rows per chunk aim at this many values
CHUNK_VALUES = 1 << 22

RowSource = Callable[[int, int], np.ndarray]  # (row_start, row_end) -> float32 [rows, row_len]


@dataclass(slots=True)
class TensorJob:
    """One output tensor: either raw bytes copied as they are, or rows re-encoded."""

    name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: str  # output type
    src_type: str
    raw: np.ndarray | None = None  # [rows, row_bytes] uint8 when copied unchanged
    rows: RowSource | None = None

    @property
    def num_rows(self) -> int:
        return prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return self.num_rows * row_bytes(self.ggml_type, self.shape[-1])

    def chunks(self) -> Iterator[tuple[bytes | np.ndarray, int]]:
        """(encoded bytes, values covered) per chunk."""
        n = self.shape[-1]
        if self.raw is not None:
            step = max(1, CHUNK_VALUES // n)
            for r in range(0, self.num_rows, step):
                part = self.raw[r : r + step]
                yield part, part.shape[0] * n
            return
        assert self.rows is not None
        qtype = gguf.GGMLQuantizationType[self.ggml_type]
        step = max(1, CHUNK_VALUES // n)
        for r in range(0, self.num_rows, step):
            dense = np.ascontiguousarray(self.rows(r, min(r + step, self.num_rows)), dtype=np.float32)
            yield encode(dense, qtype), dense.size


def encode(dense: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return dense
    if qtype == gguf.GGMLQuantizationType.F16:
        return dense.astype(np.float16)
    return gguf.quants.quantize(dense, qtype)


def write_gguf(
    path: str | os.PathLike,
    arch: str,
    kvs: list[KV],
    jobs: list[TensorJob],
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT,
    on_values: Callable[[int], None] | None = None,
) -> None:
    # tensor data plus a generous bound on the header (metadata, tensor directory, padding)
    check_free_space(Path(path).parent, sum(j.nbytes for j in jobs) + (16 << 20))
    w = gguf.GGUFWriter(str(path), arch)
    if alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        w.add_custom_alignment(alignment)
        w.data_alignment = alignment
    for kv in kvs:
        if kv.key in ("general.architecture", "general.alignment"):
            continue
        w.add_key_value(kv.key, kv.value, kv.type, kv.sub_type)
    for job in jobs:
        w.add_tensor_info(
            job.name, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=gguf.GGMLQuantizationType[job.ggml_type]
        )
    try:  # the file is closed on any exit: a cancel raised from `on_values` included
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        for job in jobs:
            written = 0
            for data, values in job.chunks():
                buf = np.ascontiguousarray(data)
                fout.write(buf.tobytes() if buf.dtype != np.uint8 else buf.data)
                written += buf.nbytes
                if on_values is not None:
                    on_values(values)
            assert written == job.nbytes, f"{job.name}: wrote {written} bytes, expected {job.nbytes}"
            w.write_padding(fout, job.nbytes)
    finally:
        w.close()
