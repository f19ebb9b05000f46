"""Fused elementwise kernels for the GPU decoder: one launch where the torch path runs several.

* `rms_norm(x, w)` and `add_rms_norm(x, residual, w)`: residual += x (rounded to the model dtype,
  as HF adds in it), then the normalised sum times w, in one pass over the row (f32 inside).
* `rope_qk_norm_kv_write(...)`: per token, optional per-head RMSNorm of q and k (qwen3, gemma3),
  the rotary embedding (NeoX halves, cos/sin read from the device tables at the token's
  position) of q and k, and the write of k and v into their pages: q comes back rotated,
  k and v never exist outside the cache.
* `act_mul(gate_up)`: act(gate) * up for the fused gate|up projection (silu or gelu_tanh).

Each intermediate is rounded to the model dtype where the torch path rounds it, so bf16 results
stay within rounding of DecoderModel's. Under TRITON_INTERPRET=1 everything is computed in f32
(the interpreter's bf16 arithmetic is wrong); the roundings are casts, which it does right.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, s_ptr, n_cols, stride_x, stride_r, stride_o,
                     eps, HAS_RES: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        s = (x + r).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, s, mask=ok)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = x * rstd * w
    if QUANT:  # e4m3 codes and the row's scale, as fp8.quantize_rows of the rounded output
        _store_e4m3_row(y.to(x_ptr.dtype.element_ty).to(tl.float32),
                        out_ptr + row * stride_o + cols, s_ptr + row, ok)
    else:
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _store_e4m3_row(y, q_ptrs, s_ptr, ok):
    """One row's per-token FP8 quantization (fp8.py's rule): scale = amax / 448, q = y / scale."""
    scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
    tl.store(q_ptrs, (y / scale).to(q_ptrs.dtype.element_ty), mask=ok)
    tl.store(s_ptr, scale)


def _norm_out(x2: torch.Tensor, quant: bool, out: torch.Tensor | None):
    """(out, scales) for a norm over rows x2: e4m3 codes and float32 [T, 1] scales with quant."""
    if quant:
        assert out is None
        return (torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x2.device),
                torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x2.device))
    if out is None:
        out = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    return out, out  # no scales: the kernel never writes s_ptr


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quant: bool = False):
    """x / rms(x) * weight over the last dim (f32 inside), in x's dtype; with quant, rows of
    [T, N] x as (e4m3 codes, float32 [T, 1] scales) for an Fp8Linear (its quantizer fused)."""
    x2 = _rows(x)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out, scales = _norm_out(x2, quant, None)
    if x2.shape[0]:
        n = x2.shape[1]
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, scales, n, x2.stride(0), 0,
                                         out.stride(0), float(eps), HAS_RES=False, QUANT=quant,
                                         BLOCK=_pow2(n), num_warps=_warps(n))
    return (out, scales) if quant else out.reshape(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, out: torch.Tensor | None = None, quant: bool = False):
    """residual += x in place; returns rms_norm(residual) * weight (into `out` when given; as
    rms_norm's (codes, scales) with quant). All [T, N] with unit-stride rows."""
    assert x.shape == residual.shape and residual.stride(-1) == 1 and x.stride(-1) == 1
    out, scales = _norm_out(residual, quant, out)
    assert out.shape == residual.shape and out.stride(-1) == 1
    if residual.shape[0]:
        n = residual.shape[1]
        _rms_norm_kernel[(residual.shape[0],)](
            x, residual, weight, out, scales, n, x.stride(0), residual.stride(0), out.stride(0),
            float(eps), HAS_RES=True, QUANT=quant, BLOCK=_pow2(n), num_warps=_warps(n))
    return (out, scales) if quant else out


def _warps(n: int) -> int:
    return 8 if n >= 4096 else 4 if n >= 1024 else 2


@triton.jit
def _rotate_heads(x_ptr, stride_h, n_heads, norm_w_ptr, cos, sin, eps,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  QK_NORM: tl.constexpr, OUT_TY: tl.constexpr):
    """(first half, second half) of every head of one token: normed (optionally), rotated,
    rounded to OUT_TY, as f32 [BLOCK_H, BLOCK_HALF] tiles."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    ok = (h < n_heads)[:, None] & (d < HALF)[None, :]
    base = x_ptr + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
    if QK_NORM:
        var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
        rstd = (1.0 / tl.sqrt(var + eps))[:, None]
        w1 = tl.load(norm_w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        x1 = (x1 * rstd * w1).to(OUT_TY).to(tl.float32)
        x2 = (x2 * rstd * w2).to(OUT_TY).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(OUT_TY).to(tl.float32)
    o2 = (x2 * cos + x1 * sin).to(OUT_TY).to(tl.float32)
    return o1, o2, ok


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_norm_ptr,
                    k_norm_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, stride_cs, stride_ch, stride_rope, n_heads, n_kv_heads,
                    eps, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr,
                    BLOCK_HALF: tl.constexpr, QK_NORM: tl.constexpr, SATURATE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cs_ok = d < HALF
    cos = tl.load(cos_ptr + pos * stride_rope + d, mask=cs_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_rope + d, mask=cs_ok, other=0.0).to(tl.float32)[None, :]
    out_ty = q_out_ptr.dtype.element_ty
    cache_ty = k_cache_ptr.dtype.element_ty

    q1, q2, q_ok = _rotate_heads(q_ptr + t * stride_qt, stride_qh, n_heads, q_norm_ptr, cos, sin,
                                 eps, HALF, BLOCK_H, BLOCK_HALF, QK_NORM, out_ty)
    h = tl.arange(0, BLOCK_H)
    q_out = q_out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(q_out, q1.to(out_ty), mask=q_ok)
    tl.store(q_out + HALF, q2.to(out_ty), mask=q_ok)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    k1, k2, k_ok = _rotate_heads(k_ptr + t * stride_kt, stride_kh, n_kv_heads, k_norm_ptr, cos,
                                 sin, eps, HALF, BLOCK_KH, BLOCK_HALF, QK_NORM, out_ty)
    kh = tl.arange(0, BLOCK_KH)
    k_dst = k_cache_ptr + slot * stride_cs + kh[:, None] * stride_ch + d[None, :]
    tl.store(k_dst, _to_cache(k1, cache_ty, SATURATE), mask=k_ok)
    tl.store(k_dst + HALF, _to_cache(k2, cache_ty, SATURATE), mask=k_ok)
    v_src = v_ptr + t * stride_vt + kh[:, None] * stride_vh + d[None, :]
    v_dst = v_cache_ptr + slot * stride_cs + kh[:, None] * stride_ch + d[None, :]
    v1 = tl.load(v_src, mask=k_ok, other=0.0).to(tl.float32)
    v2 = tl.load(v_src + HALF, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(v_dst, _to_cache(v1, cache_ty, SATURATE), mask=k_ok)
    tl.store(v_dst + HALF, _to_cache(v2, cache_ty, SATURATE), mask=k_ok)


@triton.jit
def _to_cache(x, cache_ty, SATURATE: tl.constexpr):
    """x for the KV pages; SATURATE (e4m3 pages) clamps to +-448 first, as to_cache_dtype."""
    if SATURATE:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x.to(cache_ty)


def rope_qk_norm_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                          eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] (views of the qkv output are fine: the last dim must be
    unit-stride); cos/sin [P, D/2] tables; positions and slot_mapping long [T]; caches
    [slots, Hkv, D]. Writes rotated k and v at their slots; returns rotated q [T, H, D]
    (into `out` when given)."""
    t, h, d = q.shape
    hkv = k.shape[1]
    assert d % 2 == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert cos.stride(-1) == 1 and cos.stride() == sin.stride()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    q_out = torch.empty((t, h, d), dtype=q.dtype, device=q.device) if out is None else out
    assert q_out.shape == (t, h, d) and q_out.stride(-1) == 1
    if t == 0:
        return q_out
    qk_norm = q_norm is not None
    half = d // 2
    _rope_kv_kernel[(t,)](
        q, k, v, positions, cos, sin, slot_mapping,
        q_norm if qk_norm else q, k_norm if qk_norm else q, q_out, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), cos.stride(0),
        h, hkv, float(eps), HALF=half, BLOCK_H=_pow2(h), BLOCK_KH=_pow2(hkv),
        BLOCK_HALF=_pow2(half), QK_NORM=qk_norm,
        SATURATE=k_cache.dtype == getattr(torch, "float8_e4m3fn", None),
        num_warps=4 if _pow2(h) * _pow2(half) <= 2048 else 8,
    )
    return q_out


@triton.jit
def _act_mul_cols(row_ptr, cols, ok, n_cols, ACT: tl.constexpr):
    """act(gate) * up at `cols` of one [gate | up] row, rounded to the row's dtype as torch
    rounds each op (returned in float32)."""
    g = tl.load(row_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(row_ptr + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    else:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 * tl.sigmoid(2.0 * z))
    ty = row_ptr.dtype.element_ty
    a = a.to(ty).to(tl.float32)  # the torch path rounds act(gate) before the product
    return (a * u).to(ty).to(tl.float32)


@triton.jit
def _act_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, ACT: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    p = _act_mul_cols(x_ptr + row * stride_x, cols, ok, n_cols, ACT)
    tl.store(out_ptr + row * stride_o + cols, p.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _act_mul_quant_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, N_COLS: tl.constexpr,
                          ACT: tl.constexpr, BLOCK: tl.constexpr):
    """act_mul with its row quantized to e4m3 (fp8.py's rule): a pass for the row's amax,
    a pass that writes the codes (the row is read twice, the second time from L2). N_COLS is
    a constant (the model's intermediate size): static loop bounds, which the interpreter
    needs too."""
    row = tl.program_id(0).to(tl.int64)
    src = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N_COLS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_act_mul_cols(src, cols, cols < N_COLS, N_COLS, ACT)))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    for start in range(0, N_COLS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < N_COLS
        p = _act_mul_cols(src, cols, ok, N_COLS, ACT)
        tl.store(q_ptr + row * stride_q + cols, (p / scale).to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row, scale)


def act_mul(gate_up: torch.Tensor, act: str, quant: bool = False):
    """act(gate) * up for gate_up [T, 2I] (gate first) → [T, I]; with quant as (e4m3 codes,
    float32 [T, 1] scales) for an Fp8Linear (its quantizer fused)."""
    t, two_i = gate_up.shape
    n = two_i // 2
    assert gate_up.stride(-1) == 1
    if quant:
        q = torch.empty((t, n), dtype=torch.float8_e4m3fn, device=gate_up.device)
        s = torch.empty((t, 1), dtype=torch.float32, device=gate_up.device)
        if t:
            _act_mul_quant_kernel[(t,)](gate_up, q, s, gate_up.stride(0), q.stride(0),
                                        N_COLS=n, ACT=ACTIVATIONS[act], BLOCK=min(2048, _pow2(n)),
                                        num_warps=8 if n >= 4096 else 4)
        return q, s
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(1024, _pow2(n))
        _act_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0),
                                                    out.stride(0), ACT=ACTIVATIONS[act],
                                                    BLOCK=block, num_warps=4)
    return out
