"""FP8 (e4m3) weights for the CUDA backend: `weight_format="fp8"`.

Each linear of the decoder layers (qkv, o, gate_up, down) holds its weight as float8_e4m3fn
with one float32 scale per output row (amax / 448), and quantizes its activations per token
the same way at run time ("dynamic" scaling, what vLLM's fp8 checkpoints without activation
scales do). The product is one `torch._scaled_mm` with row-wise scales on both sides, which runs
the H100's FP8 tensor cores (~2x the bf16 rate) and reads half the weight bytes. The embedding
and the output layer stay in the compute dtype (their error reaches the logits directly).

Needs compute capability 8.9+ (Ada, Hopper) and dimensions that are multiples of 16; a layer
that does not qualify stays dense.
"""

from __future__ import annotations

import torch

from localserve.backends.torch_common.layers import DenseLinear

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def fp8_supported(device: torch.device) -> bool:
    """NVIDIA compute capability 8.9+ (ROCm's FP8 is the e4m3fnuz variant: not this path)."""
    return (device.type == "cuda" and torch.version.hip is None
            and hasattr(torch, "float8_e4m3fn")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as e4m3 [M, K], float32 scales [M, 1]) with x ≈ q * scale, one scale per row: one
    Triton kernel on the GPU (a read of x, a write of q), the torch ops elsewhere."""
    if x.is_cuda and _quant_kernel is not None:
        return _quantize_rows_triton(x)
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).to(FP8), scale


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_kernel(x_ptr, q_ptr, s_ptr, n_cols, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        tl.store(q_ptr + row * n_cols + cols, (x / scale).to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(s_ptr + row, scale)
except ImportError:  # no Triton: the torch route
    _quant_kernel = None


def _quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = 1 << max(4, (k - 1).bit_length())
        _quant_kernel[(m,)](x, q, s, k, x.stride(0), BLOCK=block,
                            num_warps=min(16, max(1, block // 512)))
    return q, s


class Fp8Linear:
    """y = x @ W.T + b with W in e4m3 and per-row scales, activations quantized per token."""

    __slots__ = ("qweight_t", "scale_w", "bias", "out_dtype", "_n")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        q, s = quantize_rows(weight)
        self.qweight_t = q.t()  # [K, N] column-major: what _scaled_mm wants as mat2
        self.scale_w = s.reshape(1, -1).contiguous()  # float32 [1, N]
        self.bias = bias
        self.out_dtype = weight.dtype
        self._n = int(weight.shape[0])

    @property
    def out_features(self) -> int:
        return self._n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.mm(*quantize_rows(x.reshape(-1, shape[-1])))
        return y.reshape(*shape[:-1], self._n)

    def mm(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The product for activations already quantized per row: e4m3 q [M, K], scales s
        float32 [M, 1] (quantize_rows' output, or a fused kernel's with the same rule)."""
        return torch._scaled_mm(q, self.qweight_t, scale_a=s, scale_b=self.scale_w,
                                out_dtype=self.out_dtype, bias=self.bias)

    def nbytes(self) -> int:
        return self.qweight_t.numel() + self.scale_w.numel() * 4


def fp8_eligible(linear) -> bool:
    w = getattr(linear, "weight", None)
    return (isinstance(linear, DenseLinear) and w is not None and w.dim() == 2
            and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0)


def to_fp8(weights) -> int:
    """Replaces each eligible decoder-layer linear of TorchWeights by an Fp8Linear, freeing its
    dense weight; returns how many were converted."""
    n = 0
    for layer in weights.layers:
        for name in ("qkv", "o_proj", "gate_up", "down"):
            lin = getattr(layer, name)
            if fp8_eligible(lin):
                setattr(layer, name, Fp8Linear(lin.weight, lin.bias))
                lin.weight = None
                n += 1
    return n


def apply_weight_format(fmt: str, weights, device: torch.device, dtype: torch.dtype,
                        fallbacks: list[str]) -> str:
    """The CUDA backend's weight format: "fp8" converts the decoder layers' linears where the
    GPU has FP8 tensor cores (else a note in `fallbacks`); every other format is dense in the
    compute dtype. Returns what the backend describes."""
    if fmt != "fp8":
        return "dense"
    if not fp8_supported(device) or dtype == torch.float32:
        fallbacks.append("fp8 weights: need an FP8 GPU (compute capability 8.9+) and a "
                         "bf16/fp16 dtype; dense instead")
        return "dense"
    converted = to_fp8(weights)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the dense weights go back to the driver
    return f"fp8 ({converted} linears)"
