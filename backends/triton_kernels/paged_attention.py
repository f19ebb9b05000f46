"""Paged attention in Triton: one kernel for prefill chunks, decode rows and mixed batches.

KV layout is torch_common's: per layer K and V [num_slots, num_kv_heads, head_dim] with
slot = block_tables[b, j // block_size] * block_size + j % block_size for position j of sequence
b. Query rows are the flattened batch of a Plan (sequence b owns rows query_start_loc[b] ..
query_start_loc[b + 1]); its new tokens are the last ones of the sequence, so query row t of
b sits at position seq_len - query_len + t and sees keys j <= that position (and, with a
sliding window W, j > position - W).

One program handles QTOK query tokens of one sequence for one KV head and all GROUP query
heads sharing it (GQA without repeating K/V): its BLOCK_M = QTOK * GROUP rows (padded to
the 16 rows a tensor-core dot needs) run an online softmax over BLOCK_N keys at a time.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import interpreting

# read once: Triton decides at definition time whether a kernel is interpreted
_FP32_TILES = interpreting()


@triton.jit
def _attend_block(start, q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                  b, kvh, kv_end, window, block_size, qk_scale, stride_ks, stride_kh, stride_bt,
                  d, d_ok, BLOCK_N: tl.constexpr, FP32_TILES: tl.constexpr, IEEE: tl.constexpr):
    """One BLOCK_N-key step of the online softmax: (m, l, acc) updated."""
    k_pos = start + tl.arange(0, BLOCK_N)
    k_ok = k_pos < kv_end
    page = tl.load(block_tables_ptr + b * stride_bt + k_pos // block_size, mask=k_ok, other=0)
    slot = page.to(tl.int64) * block_size + k_pos % block_size
    kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    if FP32_TILES:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    else:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    allowed = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
    allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no key yet keeps m = -inf: subtract 0 instead (p is 0 there)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, o_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    sm_scale, window, block_size,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, QTOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FP32_TILES: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    qblk = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    if qblk * QTOK < q_len:
        seq_len = tl.load(seq_lens_ptr + b)
        rows = tl.arange(0, BLOCK_M)
        tok = qblk * QTOK + rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_ok = (rows < QTOK * GROUP) & (tok < q_len)
        q_pos = seq_len - q_len + tok
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32_TILES:
            q = q.to(tl.float32)

        first_pos = seq_len - q_len + qblk * QTOK
        kv_end = tl.minimum(first_pos + QTOK, seq_len)  # one past the last key any row sees
        # window >= 1 always (the host passes 2**30 for "none"): keys > pos - window
        kv_begin = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N

        qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if FP32_TILES:
            # the interpreter (numpy >= 2) cannot take loaded scalars as range() bounds
            start = kv_begin
            while start < kv_end:
                m_i, l_i, acc = _attend_block(
                    start, q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                    b, kvh, kv_end, window, block_size, qk_scale, stride_ks, stride_kh,
                    stride_bt, d, d_ok, BLOCK_N, FP32_TILES, IEEE)
                start += BLOCK_N
        else:
            for start in range(kv_begin, kv_end, BLOCK_N):
                m_i, l_i, acc = _attend_block(
                    start, q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                    b, kvh, kv_end, window, block_size, qk_scale, stride_ks, stride_kh,
                    stride_bt, d, d_ok, BLOCK_N, FP32_TILES, IEEE)
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_NO_WINDOW = 1 << 30


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_attention(q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
                    max_query_len: int, scale: float, window: int | None, block_size: int) -> None:
    """out[T, H, D] = attention of q[T, H, D] over the paged cache (new K/V already written).

    block_tables int32 [B, max_blocks], query_start_loc int32 [B + 1], seq_lens int32 [B], all
    on q's device; max_query_len bounds the grid (1 for a decode-only batch). Graph-capturable:
    nothing here reads device memory on the host.
    """
    t, h, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    num_seqs = block_tables.shape[0]
    # decode: one token per program; prefill: ~64 query rows per program (32 at head_dim 256,
    # whose [M, D] tiles would otherwise spill registers)
    rows = 64 if d <= 128 else 32
    qtok = 1 if max_query_len == 1 else max(1, rows // group)
    block_m = max(16, _next_pow2(qtok * group))
    block_n = 64 if d <= 128 else 32
    if _FP32_TILES:
        block_n = 16  # the interpreter's cost is per element: small tiles waste less
    grid = (num_seqs, hkv, triton.cdiv(max(max_query_len, 1), qtok))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        float(scale), int(window) if window else _NO_WINDOW, int(block_size),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        GROUP=group, QTOK=qtok, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=d, BLOCK_D=_next_pow2(d), FP32_TILES=_FP32_TILES,
        IEEE=bool(q.dtype.is_floating_point and q.element_size() == 4 and not _FP32_TILES),
        num_warps=4 if block_m * _next_pow2(d) <= 64 * 128 else 8,
    )
