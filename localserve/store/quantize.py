"""`quantize`: GGUF -> GGUF in any type gguf-py can encode, and HF safetensors -> GGUF.

Which type each tensor gets follows llama.cpp's rules where we can write them:
* vectors (norms, biases) and rope tables stay F32;
* the output projection (the token embedding when tied) keeps at least Q8_0 for targets
  under 8 bits (llama.cpp uses Q6_K there; gguf-py cannot encode K-quants);
* a matrix whose rows are not a whole number of blocks falls back to F16;
* a tensor already in the target type is copied byte for byte.
Everything else is decoded to float32 row chunk by row chunk and encoded in the target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from localserve.models.gguf_file import GGUFFile
from localserve.models.weights import GGMLTensor
from localserve.store.gguf_kv import KV, read_kvs
from localserve.store.gguf_writer import RowSource, TensorJob, write_gguf
from localserve.store.store import StoreError

# ternary types only suit models trained ternary (BitNet): encoding other weights destroys them
_REFUSED = {"TQ1_0": "ternary (BitNet-trained models only)", "TQ2_0": "ternary (BitNet-trained models only)"}
HF_TARGETS = ("F32", "F16", "BF16", "Q8_0")
_HIGH_PRECISION = ("F32", "F16", "BF16", "Q8_0")


def writable_types() -> list[str]:
    """GGML types gguf-py can encode, in enum order."""
    out = []
    probe = np.zeros((1, 256), dtype=np.float32)
    for t in gguf.GGMLQuantizationType:
        if t.name in _REFUSED:
            continue
        try:
            gguf.quants.quantize(probe, t)
        except (NotImplementedError, ValueError, TypeError, AssertionError):
            continue
        out.append(t.name)
    return out


def check_target(target: str, hf: bool = False) -> str:
    t = target.strip().upper()
    allowed = list(HF_TARGETS) if hf else writable_types()
    if t not in allowed:
        why = f" ({_REFUSED[t]})" if t in _REFUSED else ""
        src = "an HF folder" if hf else "a GGUF"
        raise StoreError(f"cannot quantize {src} to {target!r}{why}; supported: {', '.join(allowed)}")
    return t


def tensor_type(name: str, shape: tuple[int, ...], target: str, is_head: bool) -> str:
    if len(shape) < 2 or name.endswith("norm.weight") or name == "rope_freqs.weight":
        return "F32"
    kind = target
    if is_head and target not in _HIGH_PRECISION:
        kind = "Q8_0"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    if shape[-1] % block:
        kind = "F16"
    return kind


def file_type_of(target: str) -> int:
    name = "ALL_F32" if target == "F32" else f"MOSTLY_{target}"
    if target == "MXFP4":
        name = "MOSTLY_MXFP4_MOE"
    return int(gguf.LlamaFileType[name]) if name in gguf.LlamaFileType.__members__ else int(gguf.LlamaFileType.GUESSED)


@dataclass(slots=True)
class ConvertResult:
    path: Path
    target: str
    src_bytes: int
    out_bytes: int
    types: dict[str, int]  # output ggml type -> tensor count


def _rows_of(t: np.ndarray | GGMLTensor, perm: np.ndarray | None = None) -> RowSource:
    """Float32 rows [r0, r1) of a host tensor (optionally row-permuted), decoded on demand."""
    n = t.shape[-1]

    def rows(r0: int, r1: int) -> np.ndarray:
        idx = slice(r0, r1) if perm is None else perm[r0:r1]
        if isinstance(t, GGMLTensor):
            return GGMLTensor(t.ggml_type, t.raw[idx], (r1 - r0, n)).dequantize()
        return np.asarray(np.asarray(t).reshape(-1, n)[idx], dtype=np.float32)

    return rows


def _job(name: str, t: np.ndarray | GGMLTensor, out_type: str, perm: np.ndarray | None = None) -> TensorJob:
    shape = tuple(int(s) for s in t.shape)
    src_type = t.ggml_type if isinstance(t, GGMLTensor) else {np.float32: "F32", np.float16: "F16"}.get(
        np.dtype(t.dtype).type, "F32"
    )
    if src_type == out_type and perm is None:
        raw = t.raw if isinstance(t, GGMLTensor) else np.asarray(t).reshape(-1, shape[-1]).view(np.uint8)
        return TensorJob(name, shape, out_type, src_type, raw=raw)
    return TensorJob(name, shape, out_type, src_type, rows=_rows_of(t, perm))


def quantize_gguf(
    src: str | os.PathLike, dst: str | os.PathLike, target: str, on_values: Callable[[int], None] | None = None
) -> ConvertResult:
    target = check_target(target)
    f = GGUFFile(src)
    try:
        kvs = [kv for kv in read_kvs(src) if kv.key not in ("general.file_type", "general.quantization_version")]
        kvs += [
            KV("general.quantization_version", gguf.GGUFValueType.UINT32, gguf.GGML_QUANT_VERSION),
            KV("general.file_type", gguf.GGUFValueType.UINT32, file_type_of(target)),
        ]
        tied = "output.weight" not in f.tensor_infos
        jobs = []
        for name, info in f.tensor_infos.items():
            is_head = name == "output.weight" or (tied and name == "token_embd.weight")
            jobs.append(_job(name, f.tensor(name), tensor_type(name, info.shape, target, is_head)))
        alignment = int(f.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        write_gguf(dst, f.architecture, kvs, jobs, alignment, on_values)
        src_bytes = sum(i.n_bytes for i in f.tensor_infos.values())
    finally:
        f.close()
    return _result(dst, target, src_bytes, jobs)


def count_values(src: str | os.PathLike) -> int:
    """Values a conversion of `src` (GGUF or HF folder) walks: the progress bar's total."""
    from math import prod

    path = Path(src)
    if path.is_dir():
        from localserve.models.hf_loader import read_safetensors

        return sum(prod(t.shape) for st in path.glob("*.safetensors") for t in read_safetensors(st).values())
    f = GGUFFile(path)
    try:
        return sum(prod(i.shape) for i in f.tensor_infos.values())
    finally:
        f.close()


def _result(dst: str | os.PathLike, target: str, src_bytes: int, jobs: list[TensorJob]) -> ConvertResult:
    types: dict[str, int] = {}
    for j in jobs:
        types[j.ggml_type] = types.get(j.ggml_type, 0) + 1
    return ConvertResult(Path(dst), target, src_bytes, Path(dst).stat().st_size, types)
