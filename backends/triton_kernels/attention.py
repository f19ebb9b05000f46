"""TritonPagedAttention: the PagedAttention seam (see torch_common/attention.py) over the Triton
kernel, for the cuda fallback and the rocm backend. Metadata lives on the device; the decode
form has fixed shapes so CUDA graphs can capture it and refill it before each replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from localserve.backends.torch_common.attention import write_pages
from localserve.engine.plan import Plan

from .paged_attention import paged_attention


@dataclass(slots=True)
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor  # long [T]: where the step's new K/V go
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    max_query_len: int
    block_size: int


class TritonPagedAttention:
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None, device: torch.device) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = sliding_window
        self.device = torch.device(device)

    def prepare(self, plan: Plan) -> TritonAttentionMetadata:
        dev = self.device
        qsl = plan.query_start_loc
        # only the columns some sequence uses travel to the device
        width = max(1, -(-int(plan.seq_lens.max()) // plan.block_size)) if plan.num_seqs else 1
        return TritonAttentionMetadata(
            slot_mapping=_dev(plan.slot_mapping, np.int64, dev),
            block_tables=_dev(plan.block_tables[:, :width], np.int32, dev),
            query_start_loc=_dev(qsl, np.int32, dev),
            seq_lens=_dev(plan.seq_lens, np.int32, dev),
            max_query_len=int(np.diff(qsl).max()) if plan.num_seqs else 0,
            block_size=plan.block_size,
        )

    # -- fixed-shape decode metadata for graphs ----------------------------------------
    def graph_metadata(self, batch_size: int, max_blocks: int, block_size: int,
                       slot_mapping: torch.Tensor) -> TritonAttentionMetadata:
        dev = self.device
        return TritonAttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=torch.zeros(batch_size, max_blocks, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(batch_size + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(batch_size, dtype=torch.int32, device=dev),
            max_query_len=1,
            block_size=block_size,
        )

    def fill_graph_metadata(self, meta: TritonAttentionMetadata, seq_lens: np.ndarray,
                            block_tables: np.ndarray) -> None:
        """Copy a padded decode batch's seq_lens [bs] and block tables [bs, w] into `meta`."""
        meta.seq_lens.copy_(torch.from_numpy(seq_lens.astype(np.int32)), non_blocking=True)
        w = block_tables.shape[1]
        meta.block_tables[:, :w].copy_(torch.from_numpy(block_tables.astype(np.int32)),
                                       non_blocking=True)

    # -- per layer -------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: TritonAttentionMetadata,
                sliding: bool) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D]; caches [slots, Hkv, D] → [T, H * D]."""
        write_pages(k_cache, meta.slot_mapping, k)
        write_pages(v_cache, meta.slot_mapping, v)
        return self.attend(q, k_cache, v_cache, meta, sliding)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: TritonAttentionMetadata, sliding: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q over caches that already hold this step's K/V → [T, H * D] (written
        into `out`, contiguous [T, H * D], when given)."""
        t = q.shape[0]
        o = torch.empty_like(q) if out is None else out.view(t, self.num_heads, self.head_dim)
        paged_attention(
            q, k_cache, v_cache, o, meta.block_tables, meta.query_start_loc, meta.seq_lens,
            meta.max_query_len, self.scale, self.window if sliding else None, meta.block_size,
        )
        return o.reshape(t, self.num_heads * self.head_dim)


def _dev(a: np.ndarray, dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(device, non_blocking=True)
