"""ROCmBackend: CUDABackend on a ROCm build of torch (torch.version.hip), where `torch.cuda`
drives the AMD GPU through HIP. FlashInfer is CUDA-only, so attention is the Triton kernel
(torch SDPA as the fallback); HIP graphs stand in for CUDA graphs."""

from __future__ import annotations

from typing import ClassVar

from localserve.backends.cuda.backend import CUDABackend


class ROCmBackend(CUDABackend):
    name: ClassVar[str] = "rocm"
    platform: ClassVar[str] = "rocm"
    attention_order: ClassVar[tuple[str, ...]] = ("triton", "torch")
