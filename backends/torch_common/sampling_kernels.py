"""Vocabulary-wide tensor kernels for the sampler: block-wise argmax, top-k and inverse-CDF draw,
the seeded uniform, and a reusable CPU buffer.

The block tricks exist because on CPU `torch.argmax`/`torch.topk`/`cumsum` over 262144 columns
cost 0.2-0.5 ms a row while a block-wise `amax`/`sum` costs ~0.01 ms: reduce per block, then do
the exact work inside the few blocks that can matter. Each takes optional `rows` (a LongTensor of
row indices) so callers never copy a subset of a [S, V] tensor.
"""

from __future__ import annotations

import threading

import torch

BLOCK = 1024
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def uniform(seed: int, step: int, draw: int = 0) -> float:
    """A uniform in [0, 1) that is a pure function of (seed, step, draw)."""
    h = _mix64((_mix64(seed & _M64) + (step + 1) * _GOLDEN) & _M64)
    h = _mix64((h + draw * _GOLDEN) & _M64)
    return (h >> 11) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- CPU scratch

_SCRATCH_MAX = 64 << 20  # bytes kept alive between calls; larger requests get a fresh tensor
_scratch = threading.local()


def scratch(num: int, width: int) -> torch.Tensor:
    """An uninitialised fp32 CPU tensor [num, width] reused across calls of this thread.

    Why: glibc returns freed memory past its trim threshold to the OS, so two live [S, V]
    temporaries per step page-fault afresh every step (~10 ms for 16 x 262144 floats).
    """
    size = num * width
    if size * 4 > _SCRATCH_MAX:
        return torch.empty(num, width)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < size:
        # a normal tensor, even when first made under inference_mode: one made there could not
        # be written to by a later call outside it (inference tensors refuse in-place updates
        # outside inference mode), while a normal one may be written to in both
        with torch.inference_mode(False):
            buf = _scratch.buf = torch.empty(size)
    return buf[:size].view(num, width)


# ----------------------------------------------------------------------------- block kernels


def _select(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x[rows]


def block_reduce(x: torch.Tensor, block: int, op: str) -> torch.Tensor:
    """amax or sum [R, ceil(N / block)] over consecutive column blocks."""
    width = x.shape[1]
    nb = width // block
    red = getattr(x[:, : nb * block].unflatten(1, (nb, block)), op)(dim=-1)
    if nb * block < width:
        red = torch.cat([red, getattr(x[:, nb * block :], op)(dim=-1, keepdim=True)], dim=1)
    return red


def _block_cols(
    x: torch.Tensor, blocks: torch.Tensor, block: int, rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns [R, n * block], their values) of the chosen blocks [R, n] of the chosen rows;
    past-the-end columns read as -inf."""
    width = x.shape[1]
    cols = (blocks[:, :, None] * block + torch.arange(block, device=x.device)).flatten(1)
    safe = cols.clamp(max=width - 1)
    vals = x.gather(1, safe) if rows is None else x[rows[:, None], safe]
    return cols, vals.masked_fill(cols >= width, float("-inf"))


def argmax(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """torch.argmax over the last dim (first maximum on ties): the first block holding the
    maximum holds its first occurrence. Off the CPU torch.argmax is one fast kernel, and the
    block route would cost ~10 launches a step."""
    if x.shape[1] < 8 * BLOCK or x.device.type != "cpu":
        return _select(x, rows).argmax(dim=-1)
    best = _select(block_reduce(x, BLOCK, "amax"), rows).argmax(dim=-1)
    cols, vals = _block_cols(x, best[:, None], BLOCK, rows)
    return cols.gather(1, vals.argmax(dim=-1, keepdim=True)).squeeze(1)


def topk(x: torch.Tensor, k: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) sorted, exact in values: every element above the k-th largest block
    maximum lies in one of the k blocks holding the k largest maxima, and those blocks hold at
    least k elements. Which of several tied elements is returned is unspecified, as in torch."""
    width = x.shape[1]
    block = min(BLOCK, 1 << max(0, (width // (8 * k)).bit_length() - 1))  # >= 8k blocks
    if block < 16:
        return _select(x, rows).topk(k, dim=-1)
    blocks = _select(block_reduce(x, block, "amax"), rows).topk(k, dim=-1).indices
    cols, vals = _block_cols(x, blocks, block, rows)
    top, pos = vals.topk(k, dim=-1)
    return top, cols.gather(1, pos)


def draw(w: torch.Tensor, u: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse CDF over nonnegative weights [R, N] in column order: positions [R] for uniforms u.

    Two levels, so no [R, N] cumsum: block sums pick the block holding u * total, then a cumsum
    inside that block picks the token.
    """
    width = w.shape[1]
    if width <= 4 * BLOCK:
        cs = _select(w, rows).cumsum(dim=-1)
        return search(cs, u.to(cs.dtype) * cs[:, -1])
    sums = _select(block_reduce(w, BLOCK, "sum"), rows)
    bcs = sums.cumsum(dim=-1)
    target = u.to(bcs.dtype) * bcs[:, -1]
    block = search(bcs, target)
    before = (bcs - sums).gather(1, block[:, None]).squeeze(1)
    cols, inner = _block_cols(w, block[:, None], BLOCK, rows)
    inner = inner.clamp(min=0.0)  # the -inf past the end weighs nothing
    return cols.gather(1, search(inner.cumsum(dim=-1), target - before)[:, None]).squeeze(1)


def search(cs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The first position whose inclusive cumsum exceeds target, never a zero-weight one.

    Rounding can push target below 0 (a remainder inside a block) or up to the total; clamping it
    at 0 and the result at the first position reaching the total (the last positive weight)
    keeps zero-weight tokens unreachable.
    """
    total = cs[:, -1:].contiguous()
    pos = torch.searchsorted(cs, target.clamp(min=0.0)[:, None].contiguous(), right=True)
    last = torch.searchsorted(cs, total, right=False)
    return torch.minimum(pos, last).squeeze(1)
