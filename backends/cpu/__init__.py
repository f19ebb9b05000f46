"""CPU backend: the shared torch decoder (localserve.backends.torch_common) on host memory."""

import os

# Before torch loads libgomp (it reads this once): idle OpenMP threads sleep instead of
# spinning. With spinning waits, any other busy thread on a 2-core box (the HTTP server,
# another process) makes every op wait a scheduler slice at its barrier: measured 2 s per
# decode step instead of 47 ms. No effect if torch was imported earlier; set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from localserve.backends.cpu.backend import CPUBackend  # noqa: E402

__all__ = ["CPUBackend"]
