"""FlashInferPagedAttention: the PagedAttention seam over FlashInfer's paged-KV wrappers.

The torch_common cache layout [num_blocks * block_size, Hkv, D] per layer is FlashInfer's NHD
layout [num_blocks, block_size, Hkv, D] viewed differently, so no copy. Each step is planned
once (`prepare`): a decode-only step plans the decode wrappers, any other step (prefill,
chunked prefill, prefill + decode mixed) plans the prefill wrappers with a bottom-right causal
mask over the paged prefix. gemma3's sliding-window layers get their own wrapper planned with
window_left = W - 1 (a query at i sees keys i - W < j <= i).

CUDA graphs: `graph_metadata(bs)` builds decode wrappers in FlashInfer's graph mode over fixed
buffers; `fill_graph_metadata` re-plans them before each replay (host work plus small copies
into those buffers), the pattern SGLang uses, skipping plans that would not change
(flashinfer_graphs.py, also the graph-mode cascade).

Staging (`staging`, set by the backend; staging.py): the plan arrays go to FlashInfer as pinned
host tensors, which its `plan` copies with non_blocking=True. The prefill plans get the KV
lengths too (`seq_lens`): without them FlashInfer derives them on the host and copies that
pageable tensor to the device, a stream sync. The page indices are the exception:
in graph mode FlashInfer copies host indices with non_blocking=False (decode.py: "non_blocking=
(indices.device == self.device) and non_blocking"), a full stream sync that under overlap
scheduling stalls the host until the previous step ends. So we copy them into the graph's
device buffer ourselves and hand FlashInfer that device view (its copy onto itself is a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from localserve import envs
from localserve.backends.torch_common.attention import write_pages
from localserve.engine.plan import Plan

from . import flashinfer_graphs
from .cascade import CascadePolicy, SharedPrefixes

WORKSPACE_BYTES = 256 << 20


@dataclass(slots=True)
class FlashInferMetadata:
    slot_mapping: torch.Tensor  # long [T]
    wrappers: dict  # sliding (bool) → a planned wrapper
    block_size: int
    cascade: "CascadeRun | None" = None  # shared-prefix decode (cascade.py): level 0's run
    # graph mode (flashinfer_graphs.py): the page lists' buffers with the wrapper kinds that
    # read each, and a cascade graph's level 0
    page_sets: list | None = None
    level0: object | None = None


@dataclass(slots=True)
class CascadeRun:
    """Level 0 of a cascaded decode step: `wrapper` planned over the groups' shared pages,
    `rows` the batch rows in group order (device, long). In a graph, `rows` is a permutation
    of all rows and `mask` names those in a group (the merge skips the others)."""

    wrapper: object
    rows: torch.Tensor
    mask: torch.Tensor | None = None


def paged_kv_arrays(seq_lens: np.ndarray, block_tables: np.ndarray, block_size: int,
                    skip_pages: np.ndarray | None = None):
    """FlashInfer's (indptr [B+1], indices [nnz], last_page_len [B]) int32 from block tables;
    with `skip_pages`, each row's pages past its first skip_pages[i] (cascade level 1)."""
    seq_lens = seq_lens.astype(np.int64)
    npages = (seq_lens + block_size - 1) // block_size
    assert int(npages.max(initial=0)) <= block_tables.shape[1], "block table shorter than a sequence"
    cols = np.arange(block_tables.shape[1])[None, :]
    used = cols < npages[:, None]
    count = npages
    if skip_pages is not None:
        used &= cols >= skip_pages[:, None]
        count = npages - skip_pages
    indptr = np.zeros(len(seq_lens) + 1, dtype=np.int32)
    np.cumsum(count, out=indptr[1:])
    indices = block_tables[used].astype(np.int32)  # row-major: each sequence's pages in order
    last = (seq_lens - (npages - 1) * block_size).astype(np.int32)
    return indptr, indices, last


class FlashInferPagedAttention:
    name = "flashinfer"
    stages_inputs = True  # fill_graph_metadata takes the step's HostStaging

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None, dtype: torch.dtype, kv_dtype: torch.dtype,
                 device: torch.device, backend: str = "fa2",
                 workspace_bytes: int = WORKSPACE_BYTES) -> None:
        import flashinfer

        from .flashinfer_shim import install

        install(flashinfer)  # plan() without Python loops over host tensors
        self.fi = flashinfer
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = sliding_window
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.device = device
        self.backend = backend
        self.staging = None  # HostStaging for prepare(); None: pageable tensors
        # decode through the tensor-core (prefill) kernels once a KV head serves >= 4 query
        # heads, as SGLang does; it also shares their JIT module, one compile fewer
        flag = envs.FI_TENSOR_CORES.get()  # "0" / "1": for A/B runs
        self.tensor_cores = num_heads // num_kv_heads >= 4 if flag == "auto" else flag == "1"
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=device)
        kinds = [False, True] if sliding_window else [False]
        self.prefill = {s: flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=backend) for s in kinds}
        self.decode = {s: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.tensor_cores) for s in kinds}
        # shared-prefix decode (cascade.py); the backend sets the policy, None: never
        self.cascade: CascadePolicy | None = None
        self.shared = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                     backend=backend)

    def _window_left(self, sliding: bool) -> int:
        return self.window - 1 if sliding else -1

    # -- once per step ---------------------------------------------------------------
    def _host(self, a: np.ndarray, staging) -> torch.Tensor:
        if staging is None:
            return torch.from_numpy(np.ascontiguousarray(a))
        return staging.host(a)

    def prepare(self, plan: Plan) -> FlashInferMetadata:
        st = self.staging
        shared = self.cascade.shared_prefixes(plan) if self.cascade is not None else None
        arrays = paged_kv_arrays(plan.seq_lens, plan.block_tables, plan.block_size)
        indptr, indices, last = (self._host(a, st) for a in arrays)
        wrappers = {}
        cascade = None
        if plan.is_decode_only:
            for sliding, w in self.decode.items():
                if shared is not None and not sliding:  # level 1: each row's own pages
                    rest = paged_kv_arrays(plan.seq_lens, plan.block_tables, plan.block_size,
                                           shared.skip_pages)
                    self._plan_decode(w, *(self._host(a, st) for a in rest), plan.block_size,
                                      sliding)
                else:
                    self._plan_decode(w, indptr, indices, last, plan.block_size, sliding)
                wrappers[sliding] = w
            if shared is not None:
                cascade = self._plan_shared(shared, plan.block_size, st)
        else:
            qo = self._host(plan.query_start_loc.astype(np.int32, copy=False), st)
            kv_lens = self._host(plan.seq_lens.astype(np.int32, copy=False), st)
            for sliding, w in self.prefill.items():
                w.plan(qo, indptr, indices, last, self.num_heads, self.num_kv_heads,
                       self.head_dim, plan.block_size, causal=True, sm_scale=self.scale,
                       window_left=self._window_left(sliding), q_data_type=self.dtype,
                       kv_data_type=self.kv_dtype, seq_lens=kv_lens)
                wrappers[sliding] = w
        slots = self._to_device(plan.slot_mapping, st)
        return FlashInferMetadata(slot_mapping=slots, wrappers=wrappers, block_size=plan.block_size,
                                  cascade=cascade)

    def _to_device(self, a: np.ndarray, st) -> torch.Tensor:
        if st is None:
            return torch.from_numpy(a.astype(np.int64)).to(self.device, non_blocking=True)
        return st.to_device(a, torch.long)

    def _plan_shared(self, shared: SharedPrefixes, block_size: int, st) -> CascadeRun:
        """Level 0: each group's rows as the queries of one request over its shared pages,
        full pages, not causal (every shared key precedes every query)."""
        groups = shared.num_groups
        full = np.full(groups, block_size, dtype=np.int32)
        kv_lens = (np.diff(shared.kv_indptr) * block_size).astype(np.int32)
        self._plan_level0(self.shared, *(self._host(a, st) for a in (
            shared.qo_indptr, shared.kv_indptr, shared.kv_indices, full, kv_lens)), block_size)
        return CascadeRun(wrapper=self.shared, rows=self._to_device(shared.rows, st))

    def _plan_level0(self, w, qo, kv_indptr, kv_indices, last, kv_lens, block_size: int) -> None:
        w.plan(qo, kv_indptr, kv_indices, last, self.num_heads, self.num_kv_heads,
               self.head_dim, block_size, causal=False, sm_scale=self.scale,
               q_data_type=self.dtype, kv_data_type=self.kv_dtype, seq_lens=kv_lens)

    def _plan_decode(self, w, indptr, indices, last, block_size: int, sliding: bool,
                     no_split: bool = False) -> None:
        extra = {"disable_split_kv": True} if no_split else {}
        w.plan(indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim,
               block_size, window_left=self._window_left(sliding), q_data_type=self.dtype,
               kv_data_type=self.kv_dtype, sm_scale=self.scale, **extra)

    def graph_plan_mode(self, batch_size: int) -> str:
        """How a decode graph of batch_size rows keeps its plan (flashinfer_graphs.py):
        "fixed" (no split-KV, planned once) for tensor-core decode once rows x KV heads reach
        LOCALSERVE_FI_NO_SPLIT_MIN (default: 2 CTAs per SM, where FlashInfer's own split search
        stops splitting); "headroom" for the other tensor-core graphs (LOCALSERVE_FI_HEADROOM=0:
        "exact" instead, for A/B runs); "exact" for the CUDA-core decode kernel."""
        if not self.tensor_cores:
            return "exact"
        least = envs.FI_NO_SPLIT_MIN.get()
        if least is None:
            least = (2 * torch.cuda.get_device_properties(self.device).multi_processor_count
                     if self.device.type == "cuda" else 256)
        if batch_size * self.num_kv_heads >= least:
            return "fixed"
        return "headroom" if envs.FI_HEADROOM.get() else "exact"

    # -- fixed-shape decode metadata for graphs (flashinfer_graphs.py) --------------------
    def graph_metadata(self, batch_size: int, max_blocks: int, block_size: int,
                       slot_mapping: torch.Tensor, cascade: bool = False) -> FlashInferMetadata:
        return flashinfer_graphs.build(self, batch_size, max_blocks, block_size, slot_mapping,
                                       cascade)

    def fill_graph_metadata(self, meta: FlashInferMetadata, seq_lens: np.ndarray,
                            block_tables: np.ndarray, staging=None,
                            shared: SharedPrefixes | None = None) -> None:
        flashinfer_graphs.fill(self, meta, seq_lens, block_tables, staging, shared)

    @property
    def graph_cascade(self) -> bool:
        """Whether decode graphs should be captured with shared-prefix (cascade) decode too."""
        return self.cascade is not None and self.cascade.enabled

    # -- per layer -------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: FlashInferMetadata,
                sliding: bool) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D]; caches [slots, Hkv, D] → [T, H * D]."""
        write_pages(k_cache, meta.slot_mapping, k)
        write_pages(v_cache, meta.slot_mapping, v)
        return self.attend(q, k_cache, v_cache, meta, sliding)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: FlashInferMetadata, sliding: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q over caches that already hold this step's K/V → [T, H * D] (written
        into `out`, contiguous [T, H * D], when given)."""
        bs = meta.block_size
        paged = (k_cache.view(-1, bs, self.num_kv_heads, self.head_dim),
                 v_cache.view(-1, bs, self.num_kv_heads, self.head_dim))
        q = q.contiguous()
        t = q.shape[0]
        c = meta.cascade
        if c is None or sliding:
            o = meta.wrappers[sliding].run(
                q, paged, out=None if out is None else out.view(t, self.num_heads, self.head_dim))
        else:  # level 1 over each row's own pages, level 0 over the shared ones, merged
            o, lse = meta.wrappers[sliding].run(q, paged, return_lse=True)
            head, head_lse = c.wrapper.run(q.index_select(0, c.rows), paged, return_lse=True)
            rest, rest_lse = o.index_select(0, c.rows), lse.index_select(0, c.rows)
            self.fi.merge_state_in_place(rest, rest_lse, head, head_lse, mask=c.mask)
            o.index_copy_(0, c.rows, rest)
            if out is not None:
                out.view(t, self.num_heads, self.head_dim).copy_(o)
        return o.reshape(t, self.num_heads * self.head_dim) if out is None else out
