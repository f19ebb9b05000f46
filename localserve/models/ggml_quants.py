"""Dequantization of GGML block encodings to float32 with numpy.

Every block type is a fixed-size record of `type_size` bytes holding `block_size` values;
blocks run along the innermost (last numpy) axis, so a row of a [out, in] weight is a whole
number of blocks and rows are independent of each other.

The types the project's supported files use are decoded here, chunk by chunk into one
preallocated output so temporaries stay cache-sized (the 262144x640 Q8_0 embedding of the
default model decodes in well under a second). Any other type gguf-py knows (Q2_K, Q3_K,
IQ*, ...) falls back to `gguf.quants.dequantize`.
"""

from __future__ import annotations

from math import prod
from typing import Callable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as _gguf_quants

QK_K = 256
# values decoded per chunk: bounds the size of every temporary
_CHUNK_VALUES = 1 << 16

_Decoder = Callable[[np.ndarray, np.ndarray], None]  # (blocks [n, type_size] u8, out [n, block_size] f32)


def block_layout(ggml_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type name."""
    return GGML_QUANT_SIZES[_qtype(ggml_type)]


def row_bytes(ggml_type: str, row_len: int) -> int:
    block_size, type_size = block_layout(ggml_type)
    if row_len % block_size:
        raise ValueError(f"{ggml_type} rows must hold a multiple of {block_size} values, got {row_len}")
    return row_len // block_size * type_size


def dequantize(raw: np.ndarray, ggml_type: str, shape: Sequence[int]) -> np.ndarray:
    """Decode `raw` (bytes of a GGML tensor, any shape) into a fresh float32 array of `shape`."""
    shape = tuple(int(s) for s in shape)
    kind = ggml_type.upper()
    block_size, type_size = block_layout(kind)
    n_values = prod(shape)
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if n_values % block_size or data.size != n_values // block_size * type_size:
        raise ValueError(f"{kind}: {data.size} bytes do not hold {n_values} values of shape {shape}")
    if kind == "F32":
        return data.view(np.float32).reshape(shape).copy()
    blocks = data.reshape(-1, type_size)
    decode = _DECODERS.get(kind)
    if decode is None:
        out = _gguf_quants.dequantize(blocks, _qtype(kind))
        return np.asarray(out, dtype=np.float32).reshape(shape)
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // block_size)
    for start in range(0, blocks.shape[0], step):
        decode(blocks[start : start + step], out[start : start + step])
    return out.reshape(shape)


def _qtype(ggml_type: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[ggml_type.upper()]
    except KeyError:
        raise ValueError(f"unknown GGML type {ggml_type!r}") from None


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> [n, 1] float32."""
    return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """16 bytes -> 32 values: low nibbles are values 0..15, high nibbles 16..31."""
    half = qs.shape[1]
    np.bitwise_and(qs, 0x0F, out=out[:, :half], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, half:], casting="unsafe")


def _bits32(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian u32 -> [n, 32] bits, bit j at index j."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _f16_values(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = b.view(np.float16)


def _bf16_values(b: np.ndarray, out: np.ndarray) -> None:
    # bf16 is the top half of an f32
    out.view(np.uint32)[...] = b.view(np.uint16).astype(np.uint32) << 16


def _q4_0(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles(b[:, 2:], out)
    out -= 8.0
    out *= _f16(b[:, :2])


def _q4_1(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles(b[:, 4:], out)
    out *= _f16(b[:, :2])
    out += _f16(b[:, 2:4])


def _q5_0(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles(b[:, 6:], out)
    out += _bits32(b[:, 2:6]) * np.float32(16.0)
    out -= 16.0
    out *= _f16(b[:, :2])


def _q5_1(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles(b[:, 8:], out)
    out += _bits32(b[:, 4:8]) * np.float32(16.0)
    out *= _f16(b[:, :2])
    out += _f16(b[:, 2:4])


def _q8_0(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = b[:, 2:].view(np.int8)
    out *= _f16(b[:, :2])


def _q8_k(b: np.ndarray, out: np.ndarray) -> None:
    # f32 d, 256 int8 qs, 16 int16 bsums (sums of 16-value groups: not needed to decode)
    out[...] = b[:, 4 : 4 + QK_K].view(np.int8)
    out *= b[:, :4].view(np.float32)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes of packed 6-bit (scale, min) pairs of 8 sub-blocks (Q4_K / Q5_K)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> [n, 8, 32]: each 32-byte group holds sub-block 2c (low) and 2c+1 (high)."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, 8, 32)


def _q4_k(b: np.ndarray, out: np.ndarray) -> None:
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = (_f16(b[:, :2]) * sc)[:, :, None]
    offset = (_f16(b[:, 2:4]) * mn)[:, :, None]
    o = out.reshape(-1, 8, 32)
    o[...] = _k_low_nibbles(b[:, 16:])
    o *= scale
    o -= offset


def _q5_k(b: np.ndarray, out: np.ndarray) -> None:
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = (_f16(b[:, :2]) * sc)[:, :, None]
    offset = (_f16(b[:, 2:4]) * mn)[:, :, None]
    # bit j of qh[l] is the fifth bit of value l of sub-block j
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    o = out.reshape(-1, 8, 32)
    o[...] = _k_low_nibbles(b[:, 48:]) | ((qh & 1) << 4)
    o *= scale
    o -= offset


def _q6_k(b: np.ndarray, out: np.ndarray) -> None:
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(-1, 8, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(-1, 8, 32)
    scale = b[:, 192:208].view(np.int8) * _f16(b[:, 208:210])  # one per 16 values
    o = out.reshape(-1, 8, 32)
    o[...] = ql | (qh << 4)
    o -= 32.0
    out.reshape(-1, 16, 16)[...] *= scale[:, :, None]


_DECODERS: dict[str, _Decoder] = {
    "F16": _f16_values,
    "BF16": _bf16_values,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q8_K": _q8_k,
}
