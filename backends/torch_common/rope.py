"""Rotary position embeddings: inverse frequencies (with llama3/linear scaling) and cos/sin tables.

Tables are computed the way HF computes them (float32 position x float32 inv_freq, then
cos/sin), so a table lookup gives bit-identical values to HF's on-the-fly rotary.
Layout is HF's rotate_half (NeoX): dims [0, D/2) pair with [D/2, D).
"""

from __future__ import annotations

import math

import torch

from localserve.models.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    assert scaling.kind == "llama3", f"unknown rope scaling {scaling.kind!r}"
    old_ctx = scaling.original_max_position
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable:
    """cos/sin of position x inv_freq for positions [0, capacity); grows on demand."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None,
                 dtype: torch.dtype = torch.float32, initial: int = 4096) -> None:
        self.inv_freq = inv_frequencies(head_dim, theta, scaling)
        self.dtype = dtype
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)
        self._build(initial)

    def _build(self, capacity: int) -> None:
        pos = torch.arange(capacity, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [P, D/2]
        self.cos = freqs.cos().to(self.dtype)
        self.sin = freqs.sin().to(self.dtype)

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D/2] for the given positions (broadcast over heads)."""
        if max_position >= self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], max_position + 1))
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, 1, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
