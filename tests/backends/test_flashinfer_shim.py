"""backends/cuda/flashinfer_shim.py: the `max` FlashInfer's plan modules get answers as the
builtin does, and installing it touches only those modules' namespace."""

from __future__ import annotations

import builtins
import types

import pytest
import torch

from backends.cuda.flashinfer_shim import install, tensor_max


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32])
def test_tensor_max_equals_the_builtin_on_1d_tensors(dtype):
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64, 513):
        x = (torch.rand(n, generator=g) * 1000).to(dtype)
        ours, ref = tensor_max(x), builtins.max(x)
        assert isinstance(ours, torch.Tensor) and ours.dim() == 0
        assert ours.item() == ref.item()
        # FlashInfer's expressions: the longest query from an indptr, the longest KV
        indptr = torch.cumsum(torch.cat([torch.zeros(1, dtype=dtype), x.abs()]), 0).to(dtype)
        assert tensor_max(indptr[1:] - indptr[:-1]).item() == builtins.max(indptr[1:] - indptr[:-1]).item()


def test_everything_else_is_the_builtin():
    assert tensor_max([3, 9, 2]) == 9
    assert tensor_max(3, 9, 2) == 9
    assert tensor_max([], default=5) == 5
    assert tensor_max(["a", "bb"], key=len) == "bb"
    m = torch.arange(6).view(2, 3)  # 2-D: the builtin compares rows (and fails, as it does)
    with pytest.raises(RuntimeError):
        tensor_max(m)
    with pytest.raises(ValueError):
        tensor_max(torch.zeros(0))


def test_install_patches_the_plan_modules_only():
    fi = types.SimpleNamespace(prefill=types.ModuleType("prefill"), decode=types.ModuleType("decode"),
                               norm=types.ModuleType("norm"))
    assert install(fi) == ["prefill", "decode"]
    assert fi.prefill.max is tensor_max and fi.decode.max is tensor_max
    assert not hasattr(fi.norm, "max")
    assert install(types.SimpleNamespace(prefill=types.ModuleType("p"))) == ["prefill"]
    # a module function that says max(...) finds the patched name first
    exec("def longest(t):\n    return max(t).item()", fi.prefill.__dict__)
    assert fi.prefill.longest(torch.tensor([4, 11, 2], dtype=torch.int32)) == 11
