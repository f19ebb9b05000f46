"""Paged attention for the torch backends: step metadata built once, a per-layer forward.

KV pages: per layer one K and one V tensor [num_blocks * block_size, num_kv_heads, head_dim];
token at position j of a sequence lives in slot block_table[j // block_size] * block_size
+ j % block_size. New K/V are written at `Plan.slot_mapping` before attention reads them.

`PagedAttention` is the seam: cuda (FlashInfer) and rocm (Triton) provide their own
`prepare` / `forward`; `TorchPagedAttention` is the portable implementation the CPU backend
uses. On the CPU it runs the compiled kernel of localserve.backends.cpu.kernels
(paged_attention.cpp) where that builds: it reads K/V through the block tables (no gather)
and gives each query row the same bits whatever else is in the step (batched == alone);
elsewhere, and where the kernel does not build, SDPA over gathered pages. Sliding-window
semantics: a query at position i sees keys j with i - W < j <= i (W tokens, itself included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from localserve.engine.plan import Plan

if TYPE_CHECKING:
    from localserve.backends.cpu.kernels import PagedBatch


@dataclass(slots=True)
class KeyView:
    """Which cache slots a group of queries reads, and which of them each query may see."""

    slots: torch.Tensor  # long: [L] (one prefill chunk) or [B, L] (decode batch)
    mask: torch.Tensor  # bool, True = attend: [q_len, L] or [B, 1, 1, L]


@dataclass(slots=True)
class DecodeGroup:
    """All sequences with exactly one query token this step, attended in one SDPA call."""

    rows: torch.Tensor  # long [B]: their token rows in the flattened batch
    full: KeyView
    sliding: KeyView | None


@dataclass(slots=True)
class PrefillChunk:
    start: int  # token rows [start, end)
    end: int
    full: KeyView
    sliding: KeyView | None


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # long [T]
    decode: DecodeGroup | None
    prefills: list[PrefillChunk] = field(default_factory=list)
    # set when the compiled CPU kernel runs this step (then decode / prefills stay empty)
    paged: PagedBatch | None = None


class PagedAttention(Protocol):
    def prepare(self, plan: Plan) -> AttentionMetadata: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                sliding: bool) -> torch.Tensor: ...


def _slots(block_tables: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slots of `positions` ([B, L] or [L] with a 1-row table), positions clamped >= 0."""
    pos = np.maximum(positions, 0)
    blk = np.take_along_axis(block_tables, pos // block_size, axis=-1)
    return blk.astype(np.int64) * block_size + pos % block_size


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP8_MAX = 448.0  # e4m3fn's largest finite value


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast for the KV pages; into float8_e4m3fn saturated (torch's cast turns overflow into
    NaN), the fused KV write's rule too."""
    if dtype == getattr(torch, "float8_e4m3fn", None):
        x = x.clamp(-_FP8_MAX, _FP8_MAX)
    return x.to(dtype)


def write_pages(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache[slots] = x cast for the pages (index_copy_ has no e4m3 kernel on CUDA: the e4m3
    bytes are copied as uint8)."""
    x = to_cache_dtype(x, cache.dtype)
    if cache.element_size() == 1 and cache.dtype.is_floating_point:
        cache.view(torch.uint8).index_copy_(0, slots, x.view(torch.uint8))
    else:
        cache.index_copy_(0, slots, x)


def read_pages(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] (gathered as uint8 for e4m3 pages, like write_pages)."""
    if cache.element_size() == 1 and cache.dtype.is_floating_point:
        return cache.view(torch.uint8)[slots].view(cache.dtype)
    return cache[slots]


def _cpu_kernels():
    """localserve.backends.cpu.kernels where its attention kernel builds, else None."""
    from localserve.backends.cpu import kernels

    return kernels if kernels.attention_available() else None


class TorchPagedAttention:
    """The compiled CPU kernel over the pages in place, or SDPA over gathered pages (decode
    rows batched, prefill chunks one at a time).

    kernel: None picks the kernel where it builds, unless a subclass overrides `prepare`
    (cuda's DeviceTorchAttention moves the SDPA views to its device: it keeps getting them);
    False always SDPA (the reference the kernel is tested against); True requires it.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None, kernel: bool | None = None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = sliding_window
        self.kernel = kernel

    def uses_kernel(self) -> bool:
        """Whether steps run the compiled CPU kernel (decided on first use)."""
        if self.kernel is None:
            own_prepare = type(self).prepare is TorchPagedAttention.prepare
            self.kernel = own_prepare and _cpu_kernels() is not None
        elif self.kernel and _cpu_kernels() is None:
            raise RuntimeError("the CPU attention kernel did not build")
        return self.kernel

    # -- once per step ---------------------------------------------------------------
    def prepare(self, plan: Plan) -> AttentionMetadata:
        qsl = plan.query_start_loc.astype(np.int64)
        seq_lens = plan.seq_lens.astype(np.int64)
        tables = plan.block_tables
        bs = plan.block_size
        # new tokens are the last ones of each sequence: the masks below are built on that
        assert np.array_equal(plan.positions[qsl[1:] - 1], seq_lens - 1), "positions vs seq_lens"
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(plan.slot_mapping.astype(np.int64)), decode=None
        )
        if self.uses_kernel():
            from localserve.backends.cpu.kernels import PagedBatch

            meta.paged = PagedBatch.build(qsl, seq_lens, tables, bs)
        else:
            self._add_views(meta, qsl, seq_lens, tables, bs)
        return meta

    def _add_views(self, meta: AttentionMetadata, qsl: np.ndarray, seq_lens: np.ndarray,
                   tables: np.ndarray, bs: int) -> None:
        """The SDPA path's gathers and masks."""
        qlens = np.diff(qsl)
        dec = np.nonzero(qlens == 1)[0]
        if dec.size:
            meta.decode = self._decode_group(qsl[dec], seq_lens[dec], tables[dec], bs)
        for b in np.nonzero(qlens > 1)[0]:
            meta.prefills.append(
                self._prefill_chunk(int(qsl[b]), int(qsl[b + 1]), int(seq_lens[b]), tables[b], bs)
            )

    def _decode_group(self, rows: np.ndarray, seq_lens: np.ndarray, tables: np.ndarray,
                      bs: int) -> DecodeGroup:
        max_len = int(seq_lens.max())
        assert max_len <= tables.shape[1] * bs, "block table shorter than the sequence"
        j = np.arange(max_len)[None, :]
        full = KeyView(
            slots=torch.from_numpy(_slots(tables, np.broadcast_to(j, (len(rows), max_len)), bs)),
            mask=torch.from_numpy(j < seq_lens[:, None])[:, None, None, :],
        )
        sliding = None
        if self.window is not None:
            # the query is at seq_len - 1: it sees positions seq_len - W .. seq_len - 1
            w = min(self.window, max_len)
            pos = seq_lens[:, None] - w + np.arange(w)[None, :]
            sliding = KeyView(
                slots=torch.from_numpy(_slots(tables, pos, bs)),
                mask=torch.from_numpy(pos >= 0)[:, None, None, :],
            )
        return DecodeGroup(rows=torch.from_numpy(rows), full=full, sliding=sliding)

    def _prefill_chunk(self, start: int, end: int, seq_len: int, table: np.ndarray,
                       bs: int) -> PrefillChunk:
        q_pos = np.arange(seq_len - (end - start), seq_len)[:, None]

        def view(first_key: int, window: int | None) -> KeyView:
            k_pos = np.arange(first_key, seq_len)
            mask = k_pos[None, :] <= q_pos
            if window is not None:
                mask &= k_pos[None, :] > q_pos - window
            slots = _slots(table[None, :], k_pos[None, :], bs)[0]
            return KeyView(slots=torch.from_numpy(slots), mask=torch.from_numpy(mask))

        full = view(0, None)
        sliding = None
        if self.window is not None:
            sliding = view(max(0, int(q_pos[0, 0]) - self.window + 1), self.window)
        return PrefillChunk(start=start, end=end, full=full, sliding=sliding)

    # -- per layer -------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                sliding: bool) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] → attention output [T, H * D]."""
        write_pages(k_cache, meta.slot_mapping, k)
        write_pages(v_cache, meta.slot_mapping, v)
        if meta.paged is not None:
            if q.device.type == "cpu" and q.dtype in _KERNEL_DTYPES and k_cache.dtype in _KERNEL_DTYPES:
                from localserve.backends.cpu.kernels import paged_attention

                window = self.window if sliding else None
                o = paged_attention(q, k_cache, v_cache, meta.paged, self.scale, window)
                return o.to(q.dtype)
            if meta.decode is None and not meta.prefills:  # e.g. a float64 reference run
                p = meta.paged
                self._add_views(meta, p.query_start_loc.numpy().astype(np.int64),
                                p.seq_lens.numpy().astype(np.int64), p.block_tables.numpy(),
                                p.block_size)
        t = q.shape[0]
        hkv, d = self.num_kv_heads, self.head_dim
        group = self.num_heads // hkv
        dec = meta.decode
        if dec is not None and not meta.prefills and dec.rows.shape[0] == t:
            return self._decode(q, k_cache, v_cache, dec, sliding, group)
        out = q.new_empty(t, self.num_heads * d)
        if dec is not None:
            out.index_copy_(0, dec.rows,
                            self._decode(q[dec.rows], k_cache, v_cache, dec, sliding, group))
        for chunk in meta.prefills:
            view = chunk.sliding if sliding else chunk.full
            qc = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
            kc = k_cache[view.slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
            vc = v_cache[view.slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=view.mask, scale=self.scale, enable_gqa=group > 1
            )
            out[chunk.start:chunk.end] = o[0].transpose(0, 1).reshape(-1, self.num_heads * d)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                dec: DecodeGroup, sliding: bool, group: int) -> torch.Tensor:
        """q [B, H, D] of single-token queries → [B, H * D].

        GQA without repeating K/V: the `group` query heads sharing a KV head become that
        head's query rows ([B, Hkv, group, D]), since one token's heads share one mask row.
        """
        view = dec.sliding if sliding else dec.full
        b = q.shape[0]
        hkv, d = self.num_kv_heads, self.head_dim
        kc = k_cache[view.slots].to(q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
        vc = v_cache[view.slots].to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.reshape(b, hkv, group, d), kc, vc, attn_mask=view.mask, scale=self.scale
        )
        return o.reshape(b, self.num_heads * d)
