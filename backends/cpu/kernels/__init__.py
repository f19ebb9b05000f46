"""CPU kernels compiled on first use: `q8_linear` (GGML Q8_0 weights x Q8_0 activations,
q8_linear.cpp) and `paged_attention` (batch-invariant attention over the paged KV cache,
paged_attention.cpp).

Each .cpp is a plain C ABI (no torch headers) built with the system C++ compiler
(-O3 -march=native -fopenmp, ~2 s; a torch cpp_extension of it takes ~30 s on 2 cores, a
start-up stall) into a build dir under localserve's cache dir, keyed by the source, the flags
and the CPU flags (a -march=native build must not run on another CPU), and called through
ctypes with tensors' data pointers (ctypes releases the GIL). If a build fails (no compiler,
non-x86, ...) its `load` logs one warning and returns None and callers use torch;
LOCALSERVE_Q8_KERNEL=0 / LOCALSERVE_ATTENTION_KERNEL=0 force that.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from localserve import envs

log = logging.getLogger(__name__)

BLOCK = 32
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F32 = ctypes.c_float
_state: dict[str, ctypes.CDLL | None] = {}  # library name -> loaded library or None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build(source: Path, flags: list[str], target: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++/c++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent builders never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, "-o", tmp, str(source)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                               f"{compiler} exited {proc.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(slots=True)
class _Library:
    """One .cpp of this folder: built once per (source, flags, CPU), loaded once per process."""

    name: str  # the .cpp's stem
    enabled: envs.Knob[bool]  # "0" in this variable disables it
    flags: list[str]
    bind: Callable[[ctypes.CDLL], ctypes.CDLL]

    @property
    def source(self) -> Path:
        return Path(__file__).with_name(f"{self.name}.cpp")

    def path(self) -> Path:
        from localserve.paths import cache_dir

        key = hashlib.sha256(
            self.source.read_bytes() + " ".join(self.flags).encode() + _cpu_flags().encode()
        ).hexdigest()[:16]
        return cache_dir() / "cpu_kernels" / f"{self.name}_{platform.machine()}_{key}.so"

    def load(self) -> ctypes.CDLL | None:
        """The compiled library, or None when it cannot be built (warned once)."""
        if self.name in _state:  # a module global looked up per call: tests reset it
            return _state[self.name]
        lib = None
        if not self.enabled.get():
            log.warning("%s CPU kernel disabled by %s=0", self.name, self.enabled.name)
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            log.warning("%s CPU kernel: %s is not x86-64, using torch", self.name,
                        platform.machine())
        else:
            try:
                path = self.path()
                if not path.exists():
                    _build(self.source, self.flags, path)
                lib = self.bind(ctypes.CDLL(str(path)))
            except Exception as e:  # noqa: BLE001 - any build failure means: use torch
                log.warning("%s CPU kernel did not build (%s: %s); using torch", self.name,
                            type(e).__name__, e)
                lib = None
        _state[self.name] = lib
        return lib


def _bind_q8(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.q8_paths.restype = _INT
    lib.q8_paths.argtypes = []
    lib.q8_linear.restype = _INT
    lib.q8_linear.argtypes = [_P, _I64, _I64, _P, _P, _I64, _P, _INT, _INT, _INT]
    lib.q8_linear_packed.restype = _INT
    lib.q8_linear_packed.argtypes = [_P, _I64, _I64, _P, _P, _I64, _P, _INT, _INT]
    return lib


def _bind_attention(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.pa_simd.restype = _INT
    lib.pa_simd.argtypes = []
    lib.paged_attention.restype = _INT
    lib.paged_attention.argtypes = [_P, _P, _P, _P, _INT, _P, _I64, _P, _P, _I64,
                                    _I64, _I64, _I64, _I64, _I64, _F32, _INT, _INT, _INT]
    return lib


_Q8 = _Library("q8_linear", envs.Q8_KERNEL, FLAGS, _bind_q8)
# no compiler-chosen FMA contraction: bitwise batch invariance rests on every copy of the
# same source line computing the same thing (see paged_attention.cpp)
_ATTENTION = _Library("paged_attention", envs.ATTENTION_KERNEL,
                      [*FLAGS, "-ffp-contract=off"], _bind_attention)


def load():
    """The compiled q8 kernel library (ctypes), or None when it cannot be built (warned once)."""
    return _Q8.load()


def available() -> bool:
    return load() is not None


def q8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, path: int = 0,
              act_bits: int = 8) -> torch.Tensor:
    """x float32 [M, K] @ (w_q int8 [N, K] * w_scale [N, K/32] per block of 32).T → float32 [M, N].

    x is quantized per row and block of 32 first: act_bits 8 to int8 with scale max|x|/127
    (llama.cpp's Q8_0 activations), 16 to int16 with scale max|x|/32767. w_q in [-127, 127].
    path: 0 best compiled, 3 AVX-512 VNNI, 2 AVX2, 1 plain C++. Threads: torch's count.
    """
    lib = load()
    assert lib is not None, "q8 kernel unavailable"
    x = x.float().contiguous()
    w_scale = w_scale.float().contiguous()
    m, k = x.shape
    n = w_q.shape[0]
    if w_q.dtype != torch.int8 or tuple(w_q.shape) != (n, k) or k % BLOCK:
        raise ValueError(f"w_q: int8 [N, {k}] with K a multiple of {BLOCK}, got {w_q.dtype} {tuple(w_q.shape)}")
    if tuple(w_scale.shape) != (n, k // BLOCK):
        raise ValueError(f"w_scale: [{n}, {k // BLOCK}], got {tuple(w_scale.shape)}")
    if act_bits not in (8, 16):
        raise ValueError("act_bits: 8 or 16")
    w_q = w_q.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.q8_linear(x.data_ptr(), m, k, w_q.data_ptr(), w_scale.data_ptr(), n, y.data_ptr(),
                       path, act_bits, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"q8_linear: path {path} not compiled in")
    return y


def compiled_paths() -> list[int]:
    lib = load()
    return [] if lib is None else [p for p in (1, 2, 3) if lib.q8_paths() & (1 << p)]


def packed_available() -> bool:
    """Whether `q8_linear_packed` runs here (it needs AVX-512 VNNI)."""
    return 3 in compiled_paths()


def pack16(w_q: torch.Tensor, w_scale: torch.Tensor,
           act_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] codes and [N, K/32] scales → the layout of `q8_linear_packed`: output rows in
    groups of 16 (zero-padded), codes [N/16, K/32, 8, 16, 4] for act_bits 8 (4-input quads
    for vpdpbusd) or [N/16, K/32, 16, 16, 2] for 16 (input pairs for vpdpwssd), scales
    [N/16, K/32, 16]."""
    n, k = w_q.shape
    nb, kb = -(-n // 16), k // BLOCK
    pad = nb * 16 - n
    if pad:
        w_q = torch.cat([w_q, w_q.new_zeros(pad, k)])
        w_scale = torch.cat([w_scale, w_scale.new_zeros(pad, kb)])
    group = 4 if act_bits == 8 else 2
    wp = w_q.reshape(nb, 16, kb, 32 // group, group).permute(0, 2, 3, 1, 4).contiguous()
    sp = w_scale.float().reshape(nb, 16, kb).permute(0, 2, 1).contiguous()
    return wp, sp


def unpack16_rows(wp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Codes of output rows `ids` ([T] long) from a `pack16` layout → int8 [T, K]."""
    rows = wp[ids // 16, :, :, ids % 16, :]  # [T, K/32, 32 / group, group]
    return rows.reshape(ids.shape[0], -1)


def q8_linear_packed(x: torch.Tensor, wp: torch.Tensor, sp: torch.Tensor, n: int,
                     act_bits: int = 8) -> torch.Tensor:
    """`q8_linear` on `pack16(..., act_bits)` weights; n: the unpadded output count."""
    lib = load()
    assert lib is not None, "q8 kernel unavailable"
    x = x.float().contiguous()
    m, k = x.shape
    nb = -(-n // 16)
    if k % BLOCK or wp.dtype != torch.int8 or wp.numel() != nb * 16 * k or not wp.is_contiguous():
        raise ValueError("wp: contiguous int8 [ceil(N/16), K/32, ...] from pack16")
    if act_bits not in (8, 16):
        raise ValueError("act_bits: 8 or 16")
    if sp.dtype != torch.float32 or sp.numel() != nb * (k // BLOCK) * 16 or not sp.is_contiguous():
        raise ValueError("sp: contiguous float32 [ceil(N/16), K/32, 16]")
    y = torch.empty(m, n, dtype=torch.float32)
    if lib.q8_linear_packed(x.data_ptr(), m, k, wp.data_ptr(), sp.data_ptr(), n, y.data_ptr(),
                            act_bits, torch.get_num_threads()) != 0:
        raise ValueError("q8_linear_packed needs AVX-512 VNNI")
    return y


# -- paged attention -------------------------------------------------------------------------

_KV_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def attention_load():
    """The compiled attention library (ctypes), or None when it cannot be built (warned once)."""
    return _ATTENTION.load()


def attention_available() -> bool:
    return attention_load() is not None


def attention_simd() -> bool:
    """Whether the AVX-512 path is compiled in (else the portable loops run)."""
    lib = attention_load()
    return lib is not None and bool(lib.pa_simd())


@dataclass(slots=True)
class PagedBatch:
    """A step's sequences for `paged_attention`: sequence b owns query rows
    query_start_loc[b]:query_start_loc[b+1], the last ones of its seq_lens[b] tokens, whose
    K/V are in slots block_tables[b][j // block_size] * block_size + j % block_size."""

    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks], contiguous
    block_size: int
    max_slot: int  # the highest slot any sequence reads (checked against the cache)

    @classmethod
    def build(cls, query_start_loc, seq_lens, block_tables, block_size: int) -> "PagedBatch":
        """From host numpy arrays; checks what the kernel trusts (it reads block table entries
        0 .. (seq_len - 1) // block_size of each sequence, nothing past them)."""
        qsl = np.ascontiguousarray(query_start_loc, dtype=np.int32)
        lens = np.ascontiguousarray(seq_lens, dtype=np.int32)
        tables = np.ascontiguousarray(block_tables, dtype=np.int32)
        b = lens.shape[0]
        if qsl.shape != (b + 1,) or tables.ndim != 2 or tables.shape[0] != b:
            raise ValueError("query_start_loc [B+1], seq_lens [B], block_tables [B, W]")
        qlens = np.diff(qsl)
        if (qlens < 0).any() or (lens < qlens).any():
            raise ValueError("every sequence needs seq_len >= its query rows >= 0")
        used = (lens.astype(np.int64) + block_size - 1) // block_size
        if (used > tables.shape[1]).any():
            raise ValueError("block table shorter than the sequence")
        read = tables[np.arange(tables.shape[1])[None, :] < used[:, None]]
        if read.size and read.min() < 0:
            raise ValueError("negative block id")
        top = int(read.max()) if read.size else 0
        return cls(torch.from_numpy(qsl), torch.from_numpy(lens), torch.from_numpy(tables),
                   block_size, (top + 1) * block_size - 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: PagedBatch, scale: float, window: int | None = None, *,
                    simd: bool = True, split: bool | None = None) -> torch.Tensor:
    """Attention of q [T, H, D] over the paged cache k/v [num_slots, Hkv, D] (float32,
    bfloat16 or float16) → float32 [T, H * D]. Query row i of a sequence of seq_len L and
    q_len rows is at position L - q_len + i and sees keys max(0, p - window + 1) .. p
    (window None: 0 .. p); query heads h * (H / Hkv) .. share KV head h.

    Each row's result is bitwise independent of the other rows of the batch. simd False
    runs the portable loops; split True / False forces spreading one row's key chunks over
    threads or not (None: when there are few rows), which gives the same bits either way.
    """
    lib = attention_load()
    assert lib is not None, "attention kernel unavailable"
    t, h, d = q.shape
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape or k_cache.shape[2] != d:
        raise ValueError(f"k/v cache [slots, Hkv, {d}], got {tuple(k_cache.shape)} {tuple(v_cache.shape)}")
    hkv = k_cache.shape[1]
    kv_type = _KV_TYPES.get(k_cache.dtype)
    if kv_type is None or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"cache dtype {k_cache.dtype}/{v_cache.dtype}: float32, bfloat16 or float16")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k/v cache must be contiguous")
    if h % hkv:
        raise ValueError(f"{h} query heads over {hkv} KV heads")
    if int(batch.query_start_loc[-1]) != t:
        raise ValueError(f"query_start_loc ends at {int(batch.query_start_loc[-1])}, q has {t} rows")
    if batch.max_slot >= k_cache.shape[0]:
        raise ValueError(f"block tables reach slot {batch.max_slot}, cache has {k_cache.shape[0]}")
    q = q.float().contiguous()
    out = torch.empty(t, h * d, dtype=torch.float32)
    rc = lib.paged_attention(
        q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kv_type,
        batch.block_tables.data_ptr(), batch.block_tables.shape[1],
        batch.query_start_loc.data_ptr(), batch.seq_lens.data_ptr(), batch.seq_lens.shape[0],
        h, hkv, d, batch.block_size, window or 0, scale, torch.get_num_threads(),
        int(simd), -1 if split is None else int(split),
    )
    if rc != 0:
        raise ValueError(f"paged_attention rejected its arguments (rc {rc})")
    return out
