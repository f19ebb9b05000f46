"""Matrix-vector products (GEMV) for decode at batch 1 and 2.

At batch 1 a decode step is a chain of products that only stream weights, so its time is
bytes / bandwidth plus a ramp per kernel. cuBLAS's kernels for M = 1 read llama-3.1-8b's
weights at ~2.57 TB/s over a whole step on the H100 (2.05 TB/s on the 4096 x 4096 o_proj).
This kernel gives each program BLOCK_N whole weight rows (all of K, BLOCK_K at a time, loaded
once and evicted first) and the M <= 2 input rows from L2: 2.86 TB/s over the step, and faster
than cuBLAS on every llama shape at M = 1 and 2 (`benchmarks/scripts/gemv_bench.py`; benchmarks/GPU_NOTES.md,
"GEMV"). From M = 4 cuBLAS's tensor-core kernels win, so the model only routes M <= MAX_M here.

The sums are float32; the output is rounded to the weight's dtype, or written in float32
into `out` (the output layer's logits) after that same rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

MAX_M = 2  # rows this kernel beats cuBLAS at (gemv_bench on the H100)
_F32 = interpreting()


@triton.jit
def _gemv_block(k0, acc, x_rows, w_rows, offs_k, m_ok, n_ok, K):
    """acc += x[:, k0:k0+BLOCK_K] @ w[:, k0:k0+BLOCK_K].T"""
    k = k0 + offs_k
    k_ok = k < K
    x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                eviction_policy="evict_first")
    return acc + tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, b_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    if F32:  # the interpreter (numpy >= 2) cannot take scalar arguments as range() bounds
        k0 = 0
        while k0 < K:
            acc = _gemv_block(k0, acc, x_rows, w_rows, offs_k, m_ok, n_ok, K)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _gemv_block(k0, acc, x_rows, w_rows, offs_k, m_ok, n_ok, K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND:  # the weight dtype's rounding before a float32 output
        acc = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight: the best of
    gemv_bench's sweep on the H100 at M = 1 (within 2% at M = 2). Two rows a program over
    long K slices, except for long K (down: 14336), where four rows and 1,024 columns win."""
    if _F32:  # the interpreter: few, small programs
        return 16, 128, 1, 1
    if k > 8192:
        return 4, 1024, 4, 3
    block_k = min(triton.next_power_of_2(k), 4096 if n > 4096 else 2048)
    return 2, block_k, 8 if block_k >= 4096 else 4, 4


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None,
         cfg: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """y [M, N] = x @ weight.T (+ bias) for 1 <= M <= MAX_M rows x [M, K], in weight's dtype
    or into `out` (float32 out: rounded to weight's dtype first, as a cast of y would be)."""
    m = x.shape[0]
    n, k = weight.shape
    assert 0 < m <= MAX_M and x.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    y = out if out is not None else torch.empty((m, n), dtype=weight.dtype, device=x.device)
    block_n, block_k, warps, stages = cfg or config(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, bias if bias is not None else weight, m, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, ROUND=y.dtype != weight.dtype, BLOCK_M=m,
        BLOCK_N=block_n, BLOCK_K=block_k, F32=_F32, num_warps=warps, num_stages=stages)
    return y
