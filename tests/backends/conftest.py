"""The backends' tests run the Triton kernels under TRITON_INTERPRET=1 (test_cuda_backend.py and
test_triton_attention.py ask for it): set here, before any test module is imported, so that no
module defines a kernel before it and the order the modules are collected in does not matter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
