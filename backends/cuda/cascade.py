"""Shared-prefix (cascade) decode attention: the pages many running sequences share are read
once per step for all of them instead of once per sequence.

The prefix cache makes sequences that start with the same prompt share the same KV pages
(same page ids at the head of their block tables). Plain paged decode still reads those pages
once per sequence: with 16 sequences over a 2,048-token system prompt, 16 × 2,048 KV tokens a
step where 2,048 hold the information. Cascade attention splits each row's keys in two:

* level 0, the shared prefix: the rows of a group (same leading pages) go together as the
  query rows of one "prefill" request over the group's shared pages, not causal (every shared
  key precedes every query) — a tensor-core tile reads each page once for the whole group;
* level 1, the rest: an ordinary paged decode over each row's own pages past the shared ones;

and the two partial results merge exactly through their log-sum-exp (FlashInfer merge_state),
so the output is the attention over all keys (up to float rounding; no approximation). vLLM
("cascade attention") and FlashInfer's MultiLevelCascadeAttentionWrapper do the same.

`find_shared_prefixes` is the host half: numpy over a decode step's block tables. A row's last
page is never shared (it holds the page this step writes), so every row keeps >= 1 key in
level 1. Sliding-window layers do not use it (their window is short and moves).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from localserve import envs
from localserve.backends.torch_common.attention import read_pages
from localserve.engine.plan import Plan, SamplingRow
from localserve.engine.sampling_params import SamplingParams

# default of LOCALSERVE_CASCADE_MIN_GB: cascade when a step saves at least this many bytes of
# KV reads (~0.7 ms of H100 bandwidth); below it the cascade's extra kernels per layer (query
# permutation, level-0 prefill, merge, write-back: ~0.5 ms a step in a graph) eat the saving
DEFAULT_MIN_SAVED_BYTES = int(envs.CASCADE_MIN_GB.default_value * 2**30)  # 2 GiB


@dataclass(slots=True)
class SharedPrefixes:
    """The groups of one decode step whose rows share leading pages."""

    rows: np.ndarray        # int64 [R]: batch rows in a group, group after group
    qo_indptr: np.ndarray   # int32 [G+1]: group g's rows are rows[qo_indptr[g]:qo_indptr[g+1]]
    kv_indptr: np.ndarray   # int32 [G+1]: group g's shared pages, into kv_indices
    kv_indices: np.ndarray  # int32: the shared pages, group after group
    skip_pages: np.ndarray  # int64 [B]: leading pages of each batch row that level 0 serves
    saved_tokens: int       # KV tokens a step no longer reads: sum over groups (rows - 1) * shared

    @property
    def num_groups(self) -> int:
        return len(self.qo_indptr) - 1


def find_shared_prefixes(seq_lens: np.ndarray, block_tables: np.ndarray, block_size: int,
                         min_rows: int = 2, min_pages: int = 1) -> SharedPrefixes | None:
    """Groups of >= min_rows rows whose first >= min_pages pages are the same page ids, each
    with the longest run of pages all its rows share; None when there is no such group.
    Rows are grouped by their first page (one level of sharing: the common prefix of the
    whole group, not a tree)."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    npages = (seq_lens + block_size - 1) // block_size
    eligible = npages - 1  # the last page holds this step's token: never shared
    cand = np.flatnonzero(eligible >= min_pages)
    if len(cand) < min_rows:
        return None
    cand = cand[np.argsort(block_tables[cand, 0], kind="stable")]
    first = block_tables[cand, 0]
    starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])
    sizes = np.diff(np.r_[starts, len(cand)])
    if int(sizes.max()) < min_rows:
        return None
    width = int(eligible[cand].max())
    leader = cand[np.repeat(starts, sizes)]
    same = block_tables[cand, :width] == block_tables[leader, :width]
    run = np.minimum(np.cumprod(same, axis=1).sum(axis=1), eligible[cand])
    shared = np.minimum.reduceat(run, starts)
    keep = (sizes >= min_rows) & (shared >= min_pages)
    if not keep.any():
        return None
    starts, sizes, shared = starts[keep], sizes[keep], shared[keep]
    rows = np.concatenate([cand[s:s + n] for s, n in zip(starts, sizes)]).astype(np.int64)
    leaders = cand[starts]
    kv_indices = np.concatenate([block_tables[r, :k] for r, k in zip(leaders, shared)])
    skip = np.zeros(len(seq_lens), dtype=np.int64)
    skip[rows] = np.repeat(shared, sizes)
    return SharedPrefixes(
        rows=rows,
        qo_indptr=np.r_[0, np.cumsum(sizes)].astype(np.int32),
        kv_indptr=np.r_[0, np.cumsum(shared)].astype(np.int32),
        kv_indices=kv_indices.astype(np.int32),
        skip_pages=skip,
        saved_tokens=int(((sizes - 1) * shared).sum()) * block_size,
    )


@dataclass(slots=True)
class GraphCascade:
    """A step's level 0 in the fixed shapes of a CUDA graph captured for `batch_size` rows and
    `max_groups` groups: groups past the real ones are empty (no query rows, no pages), and
    `rows` is a permutation of all batch rows, grouped rows first (the level-0 query order),
    so the merge and write-back run over fixed shapes with `mask` naming the rows to merge."""

    qo_indptr: np.ndarray      # int32 [max_groups + 1]
    kv_indptr: np.ndarray      # int32 [max_groups + 1]
    kv_indices: np.ndarray     # int32 [nnz]
    last_page_len: np.ndarray  # int32 [max_groups]: full pages (shared pages are never last)
    kv_lens: np.ndarray        # int32 [max_groups]
    rows: np.ndarray           # int64 [batch_size]: a permutation
    mask: np.ndarray           # bool [batch_size]: mask[i] = rows[i] is in a group

    @classmethod
    def pad(cls, shared: SharedPrefixes, batch_size: int, max_groups: int,
            block_size: int) -> "GraphCascade":
        g = shared.num_groups
        assert g <= max_groups, (g, max_groups)
        qo = np.full(max_groups + 1, shared.qo_indptr[-1], dtype=np.int32)
        qo[: g + 1] = shared.qo_indptr
        kv = np.full(max_groups + 1, shared.kv_indptr[-1], dtype=np.int32)
        kv[: g + 1] = shared.kv_indptr
        kv_lens = (np.diff(kv) * block_size).astype(np.int32)
        rest = np.ones(batch_size, dtype=bool)
        rest[shared.rows] = False
        rows = np.concatenate([shared.rows, np.flatnonzero(rest)]).astype(np.int64)
        mask = np.zeros(batch_size, dtype=bool)
        mask[: len(shared.rows)] = True
        return cls(qo_indptr=qo, kv_indptr=kv, kv_indices=shared.kv_indices,
                   last_page_len=np.full(max_groups, block_size, dtype=np.int32),
                   kv_lens=kv_lens, rows=rows, mask=mask)

    @classmethod
    def dummy(cls, batch_size: int, max_groups: int, block_size: int,
              scratch_block: int) -> "GraphCascade":
        """What the graph is captured with: every row in one group over the scratch page
        (FlashInfer fixes the most level-0 query rows at the capture's plan)."""
        shared = SharedPrefixes(
            rows=np.arange(batch_size, dtype=np.int64),
            qo_indptr=np.array([0, batch_size], dtype=np.int32),
            kv_indptr=np.array([0, 1], dtype=np.int32),
            kv_indices=np.array([scratch_block], dtype=np.int32),
            skip_pages=np.zeros(batch_size, dtype=np.int64), saved_tokens=0)
        return cls.pad(shared, batch_size, max_groups, block_size)


# the most groups a cascade graph plans level 0 for: FlashInfer's graph-mode prefill sizes its
# split-KV scratch for (query tiles + groups); at 512 rows and 256 groups that is 568 MB, past
# the 256 MB workspace. A step with more groups runs eager.
GRAPH_MAX_GROUPS = 64


def graph_max_groups(batch_size: int) -> int:
    """Groups a cascade graph of batch_size rows has room for (a group has >= 2 rows)."""
    return max(1, min(batch_size // 2, GRAPH_MAX_GROUPS))


class CascadePolicy:
    """When a decode step is worth cascading: the KV bytes it would not read, over the layers
    that use it (the non-sliding ones), at least `min_saved_bytes`.

    LOCALSERVE_CASCADE: "auto" (default) cascades on the cascade decode graphs only (a step no
    graph fits reads every row's pages); "1" also runs such steps eager; "force" cascades
    whenever any prefix is shared; "0" never. LOCALSERVE_CASCADE_MIN_GB sets the threshold.
    An eager cascaded step costs the host ~17-26 ms of launches for llama-8b
    (benchmarks/GPU_NOTES.md, "Shared prefix"), a graph replay does not."""

    def __init__(self, kv_bytes_per_token: int, min_saved_bytes: int | None = None) -> None:
        flag = envs.CASCADE.get()
        self.enabled = flag in ("1", "auto", "force") and kv_bytes_per_token > 0
        # "auto": only on a cascade decode graph; "1" / "force" also run eager when no
        # graph fits the step (each layer's launches then cost the host ~0.5 ms)
        self.eager = flag in ("1", "force")
        if min_saved_bytes is None:
            min_saved_bytes = 0 if flag == "force" else int(envs.CASCADE_MIN_GB.get() * 2**30)
        self.min_saved_bytes = min_saved_bytes
        self.kv_bytes_per_token = kv_bytes_per_token
        self.steps = 0  # decode steps cascaded (bench reports)
        self.saved_tokens = 0  # KV tokens those steps did not read, summed
        self._memo: tuple[object, SharedPrefixes | None] | None = None

    def shared_prefixes(self, plan) -> SharedPrefixes | None:
        """The step's groups when cascading pays, else None; computed once per plan."""
        if not self.enabled or not plan.is_decode_only or plan.num_seqs < 2:
            return None
        if self._memo is not None and self._memo[0] is plan:
            return self._memo[1]
        found = None
        # an upper bound first: nothing to save unless the rows' contexts could cover it
        if int(plan.seq_lens.sum()) * self.kv_bytes_per_token >= self.min_saved_bytes:
            found = find_shared_prefixes(plan.seq_lens, plan.block_tables, plan.block_size)
            if found is not None and found.saved_tokens * self.kv_bytes_per_token < max(
                    1, self.min_saved_bytes):
                found = None
        if found is not None:
            self.steps += 1
            self.saved_tokens += found.saved_tokens
        self._memo = (plan, found)
        return found

    def decline(self, plan) -> None:
        """The step will not cascade after all (no graph for it and eager cascade is off):
        shared_prefixes(plan) answers None from now on."""
        found = self.shared_prefixes(plan)
        if found is not None:
            self.steps -= 1
            self.saved_tokens -= found.saved_tokens
        self._memo = (plan, None)


def check_plan(block_size: int, vocab_size: int, rows: int = 4, shared: int = 3) -> Plan:
    """A decode step of `rows` sequences whose first `shared` pages are the same pages and
    whose last page is their own: what the load-time check runs with and without cascade."""
    seq_len = shared * block_size + 1
    tables = np.zeros((rows, shared + 1), dtype=np.int32)
    tables[:, :shared] = np.arange(shared)
    tables[:, shared] = shared + np.arange(rows)
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    return Plan(
        seq_ids=list(range(rows)),
        input_ids=np.random.default_rng(0).integers(0, vocab_size, rows).astype(np.int64),
        positions=np.full(rows, seq_len - 1, dtype=np.int64),
        slot_mapping=(tables[:, shared].astype(np.int64) * block_size),
        query_start_loc=np.arange(rows + 1, dtype=np.int32),
        seq_lens=np.full(rows, seq_len, dtype=np.int32), block_tables=tables,
        sample_idx=np.arange(rows, dtype=np.int32),
        sampling=[SamplingRow(params=greedy, seed=0, step=0) for _ in range(rows)],
        block_size=block_size,
    )


def reference_attention(q, k_cache, v_cache, plan: Plan, scale: float):
    """fp32 attention of each decode row over all its keys, gathered page by page: what the
    check measures both decode paths against. q [B, H, D]; caches [slots, Hkv, D]."""
    import torch

    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k_cache.shape[1]
    bs = plan.block_size
    for i, n in enumerate(plan.seq_lens.tolist()):
        pages = plan.block_tables[i, :(n + bs - 1) // bs].astype(np.int64)
        slots = torch.from_numpy((pages[:, None] * bs + np.arange(bs)).reshape(-1)[:n]).to(q.device)
        k = read_pages(k_cache, slots).float().repeat_interleave(group, dim=1)  # [n, H, D]
        v = read_pages(v_cache, slots).float().repeat_interleave(group, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), k) * scale, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", w, v)
    return out


def check_cascade(attention, k_cache, v_cache, plan: Plan, policy: "CascadePolicy") -> str | None:
    """Plain and cascaded decode attention of random queries over the same pages against an
    fp32 reference; None when the cascade's error is within bf16 rounding of the plain
    path's, else the reason. `attention` is a FlashInferPagedAttention."""
    import torch

    q = torch.randn(plan.num_seqs, attention.num_heads, attention.head_dim,
                    dtype=attention.dtype, device=k_cache.device)
    used = (int(plan.block_tables.max()) + 1) * plan.block_size  # throw-away warm-up pages
    for cache in (k_cache, v_cache):  # randn has no e4m3 kernel: drawn in float32, cast
        cache[:used] = torch.randn(cache[:used].shape, device=cache.device).to(cache.dtype)
    ref = reference_attention(q, k_cache, v_cache, plan, attention.scale)
    saved = attention.cascade
    try:
        attention.cascade = None  # each prepare re-plans the shared wrappers: attend right after
        plain = attention.attend(q, k_cache, v_cache, attention.prepare(plan), False).float()
        attention.cascade = CascadePolicy(policy.kv_bytes_per_token, min_saved_bytes=0)
        meta = attention.prepare(plan)
        if meta.cascade is None:
            return "the check's step was not cascaded"
        got = attention.attend(q, k_cache, v_cache, meta, False).float()
    finally:
        attention.cascade = saved
    ref = ref.reshape(got.shape)
    scale = float(ref.abs().max())
    err, err_plain = float((got - ref).abs().max()), float((plain - ref).abs().max())
    if err <= 2 * err_plain + 1e-2 * scale:
        return None
    return (f"cascade differs from fp32 attention by {err:.3g} (plain decode {err_plain:.3g}, "
            f"values up to {scale:.3g})")


def cascade_bytes_per_token(cfg, kv_dtype) -> int:
    """KV bytes a shared-prefix token costs a decode step over the layers that cascade (the
    non-sliding ones): what CascadePolicy weighs. `cfg` a ModelConfig."""
    import torch

    el = torch.empty(0, dtype=kv_dtype).element_size()
    layers = sum(1 for s in cfg.layer_is_sliding if not s)
    return layers * 2 * cfg.num_kv_heads * cfg.head_dim * el


def load_check(model, kv, block_size: int) -> str | None:
    """The backend's load-time check of cascade decode on the warm-up's pages (`kv`): None when
    it passes or does not apply, else why it failed."""
    att = model.attention
    policy = getattr(att, "cascade", None)
    if policy is None or not policy.enabled or kv[0][0].shape[0] // block_size < 8:
        return None
    plan = check_plan(block_size, model.cfg.vocab_size)
    layer = next(i for i, s in enumerate(model.cfg.layer_is_sliding) if not s)
    try:
        return check_cascade(att, kv[layer][0], kv[layer][1], plan, policy)
    except Exception as exc:  # a JIT failure of merge_state, a FlashInfer error
        return f"{type(exc).__name__}: {exc}"
