"""FlashInfer metadata for CUDA graphs: wrappers in graph mode over fixed device buffers,
re-planned (or not: the plan memo) before each replay. `FlashInferPagedAttention` exposes
these as `graph_metadata` / `fill_graph_metadata`, the interface `DecodeGraphs` calls.

Plain decode graphs: one page list (every row's pages) read by the full and, for gemma3, the
sliding-window wrapper. Cascade decode graphs (shared-prefix decode, cascade.py) have two page
lists, each row's own pages (level 1, the non-sliding wrapper) and all its pages (the sliding
wrapper), and a level-0 prefill wrapper in graph mode over the groups' shared pages with room
for `graph_max_groups(bs)` groups; the level-0 query order (`rows`, a permutation) and the merge
mask are device buffers too, so the captured merge runs over fixed shapes.

The plan memo: FlashInfer's decode plans and its prefill plan are functions of the page indptr
(and the query indptr), the head shape and window_left only; the KV length inside a row's last
page is read on the device from last_page_len. So when every row spans as many pages as at the
last plan of the same buffers, the plan is skipped and only the page indices and last-page
lengths are refreshed: exact, and a sequence crosses into a new page once every block_size
steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cascade import GraphCascade, SharedPrefixes, graph_max_groups


@dataclass(slots=True)
class GraphPages:
    """One page list's fixed device buffers (what graph-mode wrappers read) and the page indptr
    they were last planned for."""

    indptr: torch.Tensor         # int32 [bs + 1]
    indices: torch.Tensor        # int32 [bs * max_blocks]
    last_page_len: torch.Tensor  # int32 [bs]
    planned: bytes | None = None

    @classmethod
    def zeros(cls, batch_size: int, max_blocks: int, device) -> "GraphPages":
        z = lambda n: torch.zeros(n, dtype=torch.int32, device=device)  # noqa: E731
        return cls(z(batch_size + 1), z(batch_size * max_blocks), z(batch_size))


@dataclass(slots=True)
class GraphLevel0:
    """A cascade graph's level 0: the graph-mode prefill wrapper, its page-index buffer, the
    query order and merge mask buffers, and the (query, page) indptrs last planned."""

    wrapper: object
    indices: torch.Tensor  # int32, the wrapper's page-index buffer
    rows: torch.Tensor     # long [bs]
    mask: torch.Tensor     # bool [bs]
    max_groups: int
    planned: bytes | None = None


def build(att, batch_size: int, max_blocks: int, block_size: int,
          slot_mapping: torch.Tensor, cascade: bool = False):
    """FlashInferMetadata of a graph of batch_size rows (`att` a FlashInferPagedAttention)."""
    from .flashinfer_attention import CascadeRun, FlashInferMetadata

    dev = att.device
    kinds = tuple(att.decode)  # (False,) or (False, True) with sliding-window layers
    if cascade:  # level 1 reads each row's own pages; sliding layers read all of them
        page_sets = [(GraphPages.zeros(batch_size, max_blocks, dev), (k,)) for k in kinds]
    else:
        page_sets = [(GraphPages.zeros(batch_size, max_blocks, dev), kinds)]
    wrappers = {}
    for pages, ks in page_sets:
        for k in ks:
            wrappers[k] = att.fi.BatchDecodeWithPagedKVCacheWrapper(
                att.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=att.tensor_cores,
                paged_kv_indptr_buffer=pages.indptr, paged_kv_indices_buffer=pages.indices,
                paged_kv_last_page_len_buffer=pages.last_page_len)
    level0 = run = None
    if cascade:
        groups = graph_max_groups(batch_size)
        z = lambda n: torch.zeros(n, dtype=torch.int32, device=dev)  # noqa: E731
        indices = z(batch_size * max_blocks)
        w = att.fi.BatchPrefillWithPagedKVCacheWrapper(
            att.workspace, "NHD", backend=att.backend, use_cuda_graph=True,
            qo_indptr_buf=z(groups + 1), paged_kv_indptr_buf=z(groups + 1),
            paged_kv_indices_buf=indices, paged_kv_last_page_len_buf=z(groups))
        level0 = GraphLevel0(wrapper=w, indices=indices, max_groups=groups,
                             rows=torch.arange(batch_size, dtype=torch.long, device=dev),
                             mask=torch.zeros(batch_size, dtype=torch.bool, device=dev))
        run = CascadeRun(wrapper=w, rows=level0.rows, mask=level0.mask)
    return FlashInferMetadata(slot_mapping=slot_mapping, wrappers=wrappers, block_size=block_size,
                              page_sets=page_sets, level0=level0, cascade=run)


def fill(att, meta, seq_lens: np.ndarray, block_tables: np.ndarray, staging=None,
         shared: SharedPrefixes | None = None) -> None:
    """Before a replay: the step's (padded) pages into the graph's buffers and the wrappers
    planned for them, or only the indices and last-page lengths when the memo allows."""
    from .flashinfer_attention import paged_kv_arrays

    bs = meta.block_size
    full = paged_kv_arrays(seq_lens, block_tables, bs)
    rest = None
    if meta.level0 is not None:
        skip = np.zeros(len(seq_lens), dtype=np.int64)
        if shared is not None:
            skip[: len(shared.skip_pages)] = shared.skip_pages
        rest = paged_kv_arrays(seq_lens, block_tables, bs, skip)
        if shared is None:  # the capture: every row in one group over the first (scratch) page
            level0 = GraphCascade.dummy(len(seq_lens), meta.level0.max_groups, bs,
                                        int(block_tables[0, 0]))
        else:
            level0 = GraphCascade.pad(shared, len(seq_lens), meta.level0.max_groups, bs)
        _fill_level0(att, meta.level0, level0, bs, staging)
    for pages, kinds in meta.page_sets:
        arrays = rest if rest is not None and kinds == (False,) else full
        _fill_pages(att, pages, [(k, meta.wrappers[k]) for k in kinds], arrays, bs, staging)


def _pinned(staging) -> bool:
    return staging is not None and staging.pinned


def _fill_pages(att, pages: GraphPages, wrappers, arrays, block_size: int, staging) -> None:
    indptr, indices, last = arrays
    key = indptr.tobytes()
    if _pinned(staging):
        # the indices go to the device buffer here: FlashInfer's graph-mode plan would copy
        # host indices with non_blocking=False (a stream sync); its copy onto itself is a no-op
        dev = pages.indices[: len(indices)]
        dev.copy_(staging.host(indices), non_blocking=True)
        if key == pages.planned:
            pages.last_page_len.copy_(staging.host(last), non_blocking=True)
            return
        indptr, indices, last = staging.host(indptr), dev, staging.host(last)
    else:
        st = staging if staging is not None and staging.enabled else None
        indptr, indices, last = (att._host(a, st) for a in (indptr, indices, last))
    for sliding, w in wrappers:
        att._plan_decode(w, indptr, indices, last, block_size, sliding)
    pages.planned = key


def _fill_level0(att, l0: GraphLevel0, gc: GraphCascade, block_size: int, staging) -> None:
    st = staging if staging is not None and staging.enabled else None
    if st is not None:
        st.copy_to(l0.rows, gc.rows)
        st.copy_to(l0.mask, gc.mask)
    else:
        l0.rows.copy_(torch.from_numpy(gc.rows))
        l0.mask.copy_(torch.from_numpy(gc.mask))
    key = gc.qo_indptr.tobytes() + gc.kv_indptr.tobytes()
    indices = gc.kv_indices
    if _pinned(staging):
        indices = l0.indices[: len(gc.kv_indices)]
        indices.copy_(staging.host(gc.kv_indices), non_blocking=True)
        if key == l0.planned:
            return
    else:
        indices = att._host(indices, st)
    host = lambda a: att._host(a, st)  # noqa: E731
    att._plan_level0(l0.wrapper, host(gc.qo_indptr), host(gc.kv_indptr), indices,
                     host(gc.last_page_len), host(gc.kv_lens), block_size)
    l0.planned = key
