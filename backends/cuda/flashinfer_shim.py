"""A host-time fix for FlashInfer's plan(), installed when the FlashInfer attention loads.

FlashInfer 0.5.3's `BatchPrefillWithPagedKVCacheWrapper.plan` takes Python's builtin `max` over
host tensors (the longest query, the longest KV), and so does the tensor-core
`BatchDecodeWithPagedKVCacheWrapper.plan` (the longest KV): the builtin walks the tensor row by
row, making a 0-d tensor and a tensor comparison per row. With two wrappers (full and sliding
window) that is four walks over the batch per prefill or mixed step, about 0.3 ms of host time
at 32 rows on the H100's host (cProfile, benchmarks/GPU_NOTES.md "Ramp-up gaps"), while the GPU waits. Its
modules get a `max` that reduces a non-empty 1-D tensor in one call (the same value; `.item()`
follows) and is the builtin for everything else. The plan's own arguments and results are
unchanged.
"""

from __future__ import annotations

import builtins

import torch

_PATCHED_MODULES = ("prefill", "decode")


def tensor_max(*args, **kwargs):
    """builtins.max, except that max(t) of a non-empty 1-D tensor is t.max() (a 0-d tensor of
    the same value as the builtin's answer, found without a Python loop)."""
    if len(args) == 1 and not kwargs:
        x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() == 1 and x.numel() > 0:
            return x.max()
    return builtins.max(*args, **kwargs)


def install(fi) -> list[str]:
    """Gives flashinfer's plan modules `tensor_max` as their `max`; returns the modules patched
    (those present: a FlashInfer without one of them keeps going)."""
    done = []
    for name in _PATCHED_MODULES:
        mod = getattr(fi, name, None)
        if mod is None:
            continue
        if mod.__dict__.get("max") is not tensor_max:
            mod.max = tensor_max
        done.append(name)
    return done
