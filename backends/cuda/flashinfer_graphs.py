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
page is read on the device from last_page_len. So a plan is skipped while it still covers the
step's pages, and only the page indices and last-page lengths are refreshed.
Three kinds of plan memo, by the graph's page list (`att.graph_plan_mode(bs)`):
* "fixed": a tensor-core decode plan with split-KV disabled (one CTA per row and KV head, no
  merge kernel) depends on the batch size alone, the kernel reading every row's pages and
  lengths from the buffers. Graphs whose rows x KV heads fill the GPU anyway are planned once,
  at capture.
* "headroom": the other tensor-core graphs plan split-KV for HEADROOM_PAGES more pages per row
  than it has, and keep that plan while no row has more pages than it was planned for. Chunks
  past a row's true length are empty: the kernel clamps each chunk to the length it reads from
  the buffers (prefill.cuh: chunk_start = min(..., kv_len)) and the merge gives an empty chunk
  (lse -inf) no weight. A steady batch re-plans once every HEADROOM_PAGES pages, not whenever
  any row crosses into a page.
* "exact": the CUDA-core decode kernel does not clamp its chunks, so its plan must match the
  pages: re-planned whenever the page indptr changes.
A page list's three buffers are views of one device arena, so a step's pages go in with one
copy, after any plan (whose own copies hold the padded indptr).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cascade import GraphCascade, SharedPrefixes, graph_max_groups


HEADROOM_PAGES = 8  # pages past each row's own that a "headroom" plan covers


@dataclass(slots=True)
class GraphPages:
    """One page list's fixed device buffers (what graph-mode wrappers read), views of one
    arena [indptr | last_page_len | indices]; the plan memo's mode and what the wrappers were
    last planned for (pages per row; for "exact" the indptr's bytes)."""

    arena: torch.Tensor          # int32 [2 bs + 1 + bs * max_blocks]
    indptr: torch.Tensor         # int32 [bs + 1]
    last_page_len: torch.Tensor  # int32 [bs]
    indices: torch.Tensor        # int32 [bs * max_blocks]
    mode: str = "exact"          # "fixed" | "headroom" | "exact" (the module's docstring)
    planned: object = None

    @classmethod
    def zeros(cls, batch_size: int, max_blocks: int, device, mode: str = "exact") -> "GraphPages":
        arena = torch.zeros(2 * batch_size + 1 + batch_size * max_blocks, dtype=torch.int32,
                            device=device)
        return cls(arena, arena[:batch_size + 1], arena[batch_size + 1:2 * batch_size + 1],
                   arena[2 * batch_size + 1:], mode)

    def plan_for(self, indptr: np.ndarray, last: np.ndarray, block_size: int):
        """None while the last plan holds for these pages, else (indptr, last_page_len, memo)
        to plan the wrappers with (then `planned = memo`)."""
        if self.mode == "fixed":
            return None if self.planned is not None else (indptr, last, True)
        if self.mode == "exact":
            key = indptr.tobytes()
            return None if key == self.planned else (indptr, last, key)
        pages = np.diff(indptr)
        held = self.planned
        if held is not None and len(held) == len(pages) and bool((pages <= held).all()):
            return None
        pages = pages + HEADROOM_PAGES
        padded = np.zeros(len(indptr), dtype=np.int32)
        np.cumsum(pages, out=padded[1:])
        return padded, np.full(len(last), block_size, dtype=np.int32), pages


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
    mode = att.graph_plan_mode(batch_size)
    if cascade:  # level 1 reads each row's own pages; sliding layers read all of them
        page_sets = [(GraphPages.zeros(batch_size, max_blocks, dev, mode), (k,)) for k in kinds]
    else:
        page_sets = [(GraphPages.zeros(batch_size, max_blocks, dev, mode), kinds)]
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
    plan = pages.plan_for(indptr, last, block_size)
    rows, n = len(last), len(indices)
    if _pinned(staging):
        if plan is not None:
            # FlashInfer's graph-mode plan would copy host indices with non_blocking=False (a
            # stream sync): it gets the device view (its copy onto itself is a no-op)
            p_indptr, p_last, memo = plan
            for sliding, w in wrappers:
                att._plan_decode(w, staging.host(p_indptr), pages.indices[:n],
                                 staging.host(p_last), block_size, sliding,
                                 no_split=pages.mode == "fixed")
            pages.planned = memo
        # the step's pages in one copy, after the plan's own copies (of a padded indptr)
        host, view = staging.empty(2 * rows + 1 + n, torch.int32)
        view[:rows + 1] = indptr
        view[rows + 1:2 * rows + 1] = last
        view[2 * rows + 1:] = indices
        pages.arena[:len(view)].copy_(host, non_blocking=True)
        return
    st = staging if staging is not None and staging.enabled else None
    if plan is not None:
        p_indptr, p_last, memo = plan
        for sliding, w in wrappers:
            att._plan_decode(w, att._host(p_indptr, st), att._host(indices, st),
                             att._host(p_last, st), block_size, sliding,
                             no_split=pages.mode == "fixed")
        pages.planned = memo
    for dst, a in ((pages.indptr, indptr), (pages.last_page_len, last),
                   (pages.indices[:n], indices)):
        dst.copy_(att._host(a, st), non_blocking=st is not None)


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
