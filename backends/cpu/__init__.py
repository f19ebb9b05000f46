"""CPU backend: the shared torch decoder (localserve.backends.torch_common) on host memory."""

from localserve.backends.cpu.backend import CPUBackend

__all__ = ["CPUBackend"]
