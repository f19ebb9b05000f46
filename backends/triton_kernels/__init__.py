"""Triton kernels shared by the cuda and rocm backends (paged attention).

They also run on the CPU under `TRITON_INTERPRET=1` (the CI path): there every tile is cast to
float32 inside the kernel, because the interpreter's bf16 arithmetic is wrong.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (read when the kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> tuple[bool, str]:
    """(usable, reason): Triton importable, and a GPU to run on unless interpreting."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing at import
        return False, f"triton cannot be imported: {exc}"
    if interpreting():
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    import torch

    if not torch.cuda.is_available():
        return False, "triton needs a CUDA or ROCm GPU (or TRITON_INTERPRET=1)"
    return True, f"triton {triton.__version__}"
