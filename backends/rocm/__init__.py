"""The ROCm backend: the cuda backend's model and runner on an AMD GPU, attention in Triton."""

from .backend import ROCmBackend

__all__ = ["ROCmBackend"]
