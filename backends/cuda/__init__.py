"""The CUDA backend: the shared torch decoder on an NVIDIA GPU with FlashInfer attention (Triton
and torch SDPA as fallbacks), CUDA graphs for decode and on-device sampling."""

from .backend import CUDABackend

__all__ = ["CUDABackend"]
