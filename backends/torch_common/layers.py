"""Linear layers in the weight formats the torch backends compute with, and RMSNorm.

Every linear takes activations in the model's compute dtype and returns that dtype; a
quantized layer casts to the activation dtype its kernel wants internally. Weights are
[out_features, in_features] (HF orientation), like the host tensors they are made from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Weight formats a torch backend can hold a linear in.
WEIGHT_FORMATS = ("dense", "int8", "q8", "q8k", "q8k8", "int4")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * weight, computed in float32 (as HF does) and returned in x's dtype.

    `weight` is the effective multiplier (gemma's 1 + w already folded in by the loader).
    """
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)


class DenseLinear:
    """y = x @ W.T + b in the weight's dtype (float32 for the reference path, or bf16)."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.contiguous()
        self.bias = bias

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype:
            y = F.linear(x, w)
        else:
            y = F.linear(x.to(w.dtype), w).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int8Linear:
    """Weight-only int8, symmetric per output row: W ≈ q[N,K] * scale[N].

    Runs `aten._weight_int8pack_mm`, whose CPU kernel is only fast with bf16 activations.
    """

    __slots__ = ("qweight", "scales", "bias", "act_dtype")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        w = weight.float()
        amax = w.abs().amax(dim=1).clamp(min=1e-12)
        scale = amax / 127.0
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scale.to(act_dtype)
        self.bias = bias
        self.act_dtype = act_dtype

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.act_dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales).to(x.dtype)
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()


class Int4Linear:
    """Weight-only int4, asymmetric per group of `group_size` input columns.

    Stored as torch's CPU tinygemm layout: q in [0, 15], W ≈ (q - 8) * scale + zero, with
    [K/group, N, 2] (scale, zero) pairs; `aten._weight_int4pack_mm_for_cpu` wants bf16.
    """

    __slots__ = ("packed", "scales_and_zeros", "group_size", "bias", "act_dtype", "n")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = 32, act_dtype: torch.dtype = torch.bfloat16) -> None:
        n, k = weight.shape
        assert k % group_size == 0, f"in_features {k} not a multiple of group {group_size}"
        wg = weight.float().reshape(n, k // group_size, group_size)
        lo = wg.amin(dim=-1)
        hi = wg.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)  # [N, G]
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self._set(q.reshape(n, k), scale, lo, group_size, act_dtype)
        self.bias = bias

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   group_size: int, act_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """W = codes * scale + offset per group; codes int in [0, 15] [N, K]; scale, offset [N, G]."""
        self = cls.__new__(cls)
        n = codes.shape[0]
        self._set(codes.reshape(n, -1), scale, offset, group_size, act_dtype)
        self.bias = None
        return self

    def _set(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
             group_size: int, act_dtype: torch.dtype) -> None:
        # tinygemm dequantizes (code - 8) * scale + zero, so zero = offset + 8 * scale
        zero = offset + 8.0 * scale
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).contiguous(), 1
        )
        self.scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(act_dtype)
        self.group_size = group_size
        self.act_dtype = act_dtype
        self.n = int(codes.shape[0])

    @property
    def out_features(self) -> int:
        return self.n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.mm(x.reshape(-1, shape[-1]).to(self.act_dtype)).to(x.dtype)
        y = y.reshape(*shape[:-1], self.n)
        return y if self.bias is None else y + self.bias

    def mm(self, x2: torch.Tensor) -> torch.Tensor:
        """[M, K] in act_dtype → [M, N] in act_dtype."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_and_zeros
        )

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + (
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()
        )


class Int8GroupLinear:
    """Symmetric int8 with one scale per group of 32 inputs (GGML's Q8_0), run as two int4 matmuls.

    q = 16 * hi + lo with hi in [-8, 7], lo in [0, 15]: W = d * q is exactly
    (hi + 8) * 16d - 128d  +  lo * d, two int4 layers (codes in [0, 15]) sharing the input.
    Same bytes as per-row int8, but from a Q8_0 source it reproduces the file's weights
    (up to bf16 scales) instead of re-rounding them to one scale per row, which matters
    most for the output layer.
    """

    __slots__ = ("hi", "lo", "qweight", "group_scales", "bias", "n")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = 32, act_dtype: torch.dtype = torch.bfloat16,
                 row_lookup: bool = False) -> None:
        n, k = weight.shape
        wg = weight.float().reshape(n, k // group_size, group_size)
        d = (wg.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)  # [N, G]
        q = torch.round(wg / d[..., None]).clamp(-127, 127).to(torch.int32)
        hi = torch.div(q, 16, rounding_mode="floor")
        lo = q - 16 * hi
        self.hi = Int4Linear.from_codes(hi + 8, 16.0 * d, -128.0 * d, group_size, act_dtype)
        self.lo = Int4Linear.from_codes(lo, d, torch.zeros_like(d), group_size, act_dtype)
        # row-indexable codes, kept only for embedding lookups through a tied output layer
        self.qweight = q.to(torch.int8).reshape(n, k) if row_lookup else None
        self.group_scales = d if row_lookup else None
        self.bias = bias
        self.n = n

    @property
    def out_features(self) -> int:
        return self.n

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        assert self.qweight is not None, "built without row_lookup"
        q = self.qweight[ids].to(dtype)
        g = self.group_scales.shape[1]
        return (q.reshape(q.shape[0], g, -1) * self.group_scales[ids].to(dtype)[..., None]).reshape(
            q.shape[0], -1
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.hi.act_dtype)
        # the two halves are summed in float32: each is a bf16-rounded partial product
        y = self.hi.mm(x2).float().add_(self.lo.mm(x2).float()).to(x.dtype)
        y = y.reshape(*shape[:-1], self.n)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return self.hi.nbytes() + self.lo.nbytes()


class Q8KernelLinear:
    """GGML Q8_0 weights (int8 codes, one float32 scale per 32 inputs) run by the compiled
    kernels of localserve.backends.cpu.kernels: activations are quantized per row and block
    of 32 too (act_bits 8: int8, llama.cpp's Q8_0 vec_dot; 16: int16) and the block dot
    products are integer. On AVX-512 VNNI the codes are held packed by 16 output rows
    (`pack16`), ~3x faster than row-major at 16 rows; otherwise row-major.

    Longer inputs (prefill) run in chunks of `max_kernel_rows` through the same kernel, so
    each row's result is independent of the batch it is in.
    """

    __slots__ = ("qweight", "group_scales", "packed", "bias", "n", "k", "kernels", "act_bits")

    max_kernel_rows = 16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels,
                 act_bits: int = 16, group_size: int = 32) -> None:
        self._hold(*self.quantize(weight, group_size), bias, kernels, act_bits)

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [N, K], float32 scales [N, K / group_size]) of a float weight."""
        n, k = weight.shape
        wg = weight.float().reshape(n, k // group_size, group_size)
        # from a Q8_0 source, amax = 127 * d exactly, so this reproduces the file's codes
        d = (wg.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)  # [N, G]
        q = torch.round(wg / d[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
        return q, d.float()

    @classmethod
    def from_codes(cls, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None, kernels,
                   act_bits: int = 16) -> "Q8KernelLinear":
        """The layer from codes and scales quantize() gave before (a prepared-weights cache)."""
        layer = cls.__new__(cls)
        layer._hold(q, d, bias, kernels, act_bits)
        return layer

    def _hold(self, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None, kernels, act_bits: int) -> None:
        n, k = q.shape
        self.n, self.k = n, k
        self.bias = bias
        self.kernels = kernels
        self.act_bits = act_bits
        # exactly one layout is held: packed (codes, scales) or row-major qweight/group_scales
        self.packed = None
        self.qweight = self.group_scales = None
        if kernels.packed_available():
            self.packed = kernels.pack16(q, d.float(), act_bits)
        else:
            self.qweight = q.contiguous()
            self.group_scales = d.float().contiguous()

    @property
    def out_features(self) -> int:
        return self.n

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized weight rows `ids` ([T] long) in `dtype` (embedding lookups, prefill)."""
        if self.packed is not None:
            wp, sp = self.packed
            q = self.kernels.unpack16_rows(wp, ids).to(dtype)
            d = sp[ids // 16, :, ids % 16].to(dtype)
        else:
            q = self.qweight[ids].to(dtype)
            d = self.group_scales[ids].to(dtype)
        g = d.shape[1]
        return (q.reshape(q.shape[0], g, -1) * d[..., None]).reshape(q.shape[0], -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # every row goes through the same integer kernel, in chunks of max_kernel_rows: a
        # row's result never depends on what else is in the step (batched == alone)
        x2 = x2.float().contiguous()
        parts = [self._kernel(x2[i : i + self.max_kernel_rows])
                 for i in range(0, x2.shape[0], self.max_kernel_rows)]
        y = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(x.dtype)
        y = y.reshape(*shape[:-1], self.n)
        return y if self.bias is None else y + self.bias

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.kernels.q8_linear_packed(x2, *self.packed, self.n, self.act_bits)
        return self.kernels.q8_linear(x2, self.qweight, self.group_scales, 0, self.act_bits)

    def nbytes(self) -> int:
        if self.packed is not None:
            return sum(t.numel() * t.element_size() for t in self.packed)
        return self.qweight.numel() + self.group_scales.numel() * 4


Linear = DenseLinear | Int8Linear | Int4Linear | Int8GroupLinear | Q8KernelLinear


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str,
                dtype: torch.dtype, row_lookup: bool = False) -> Linear:
    """A linear layer holding `weight` (float, [out, in]) in format `fmt`.

    "int8": per-row int8; "q8": int8 per group of 32 (Int8GroupLinear); "q8k" / "q8k8": the
    same codes run by the compiled Q8_0 kernel (Q8KernelLinear) with int16 / int8 (llama.cpp)
    activations, "q8" when it does not build or in_features is not a multiple of 32; "int4": int4 per group of 32. The int4 kernels
    need shapes `_int4_ok` accepts; other shapes use int8.
    `row_lookup`: the layer also serves embedding rows (a tied output layer).
    """
    if bias is not None:
        bias = bias.to(dtype)
    if fmt == "int8":
        return Int8Linear(weight, bias)
    if fmt in ("q8k", "q8k8"):
        kernel = q8_kernel()
        if kernel is not None and weight.shape[1] % 32 == 0:
            return Q8KernelLinear(weight, bias, kernel, act_bits=8 if fmt == "q8k8" else 16)
        fmt = "q8"
    if fmt == "q8":
        if _int4_ok(weight.shape, 32):
            return Int8GroupLinear(weight, bias, row_lookup=row_lookup)
        return Int8Linear(weight, bias)
    if fmt == "int4":
        if _int4_ok(weight.shape, 32):
            return Int4Linear(weight, bias, group_size=32)
        return Int8Linear(weight, bias)
    assert fmt == "dense", f"unknown weight format {fmt!r}"
    return DenseLinear(weight.to(dtype), bias)


def _int4_ok(shape: torch.Size, group_size: int) -> bool:
    n, k = shape
    # the CPU int4 pack kernel packs pairs along K and tiles N
    return k % group_size == 0 and k % 2 == 0 and n % 8 == 0


def q8_kernel():
    """localserve.backends.cpu.kernels where its Q8_0 kernel builds, else None (warned once)."""
    from localserve.backends.cpu import kernels

    return kernels if kernels.available() else None
