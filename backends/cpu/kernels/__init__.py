"""CPU matmul kernels compiled on first use: `q8_linear`, GGML Q8_0 weights x Q8_0 activations.

q8_linear.cpp is a plain C ABI (no torch headers) built with the system C++ compiler
(-O3 -march=native -fopenmp, ~2 s; a torch cpp_extension of it takes ~30 s on 2 cores, a
start-up stall) into a build dir under localserve's cache dir, keyed by the source and the
CPU flags (a -march=native build must not run on another CPU), and called through ctypes
with tensors' data pointers (ctypes releases the GIL). If the build fails (no compiler,
non-x86, ...) `load()` logs one warning and returns None; LOCALSERVE_Q8_KERNEL=0 forces that.
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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("q8_linear.cpp")
BLOCK = 32
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_state: dict[str, object] = {}
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _library_path() -> Path:
    from localserve.paths import cache_dir

    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    return cache_dir() / "cpu_kernels" / f"q8_linear_{platform.machine()}_{key}.so"


def _build(target: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++/c++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent builders never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                               f"{compiler} exited {proc.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.q8_paths.restype = _INT
    lib.q8_paths.argtypes = []
    lib.q8_linear.restype = _INT
    lib.q8_linear.argtypes = [_P, _I64, _I64, _P, _P, _I64, _P, _INT, _INT, _INT]
    lib.q8_linear_packed.restype = _INT
    lib.q8_linear_packed.argtypes = [_P, _I64, _I64, _P, _P, _I64, _P, _INT, _INT]
    return lib


def load():
    """The compiled kernel library (ctypes), or None when it cannot be built (warned once)."""
    if "lib" in _state:
        return _state["lib"]
    lib = None
    if os.environ.get("LOCALSERVE_Q8_KERNEL", "1") == "0":
        log.warning("q8 CPU kernel disabled by LOCALSERVE_Q8_KERNEL=0")
    elif platform.machine().lower() not in ("x86_64", "amd64"):
        log.warning("q8 CPU kernel: %s is not x86-64, using torch kernels", platform.machine())
    else:
        try:
            path = _library_path()
            if not path.exists():
                _build(path)
            lib = _bind(ctypes.CDLL(str(path)))
        except Exception as e:  # noqa: BLE001 - any build failure means: use torch kernels
            log.warning("q8 CPU kernel did not build (%s: %s); using torch kernels",
                        type(e).__name__, e)
            lib = None
    _state["lib"] = lib
    return lib


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
