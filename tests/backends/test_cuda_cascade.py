"""Shared-prefix (cascade) decode: the host half that splits each row's pages between the
shared level and its own level (backends/cuda/cascade.py), checked on numpy. The FlashInfer
half runs on the GPU: the backend checks it against plain decode at load, and
benchmarks/scripts/cascade_bench.py measures it."""

import numpy as np
import pytest

from localserve.backends.cuda.cascade import (
    CascadePolicy,
    GraphCascade,
    check_plan,
    find_shared_prefixes,
    graph_max_groups,
)
from localserve.backends.cuda.flashinfer_attention import paged_kv_arrays

BS = 16


def random_batch(rng, groups: int, loners: int):
    """Rows of `groups` groups whose members start with the group's pages, then own pages;
    plus rows with only their own pages. Returns seq_lens, block_tables, row pages."""
    next_page = [0]

    def fresh(n):
        out = list(range(next_page[0], next_page[0] + n))
        next_page[0] += n
        return out

    rows = []
    for _ in range(groups):
        head = fresh(int(rng.integers(1, 6)))
        for _ in range(int(rng.integers(1, 5))):
            # a member may share only part of the head (a shorter cached prompt)
            k = int(rng.integers(1, len(head) + 1))
            own = int(rng.integers(0, 4))
            rows.append(head[:k] + fresh(own))
    for _ in range(loners):
        rows.append(fresh(int(rng.integers(1, 6))))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    width = max(len(r) for r in rows) + 2
    tables = np.full((len(rows), width), 10_000, dtype=np.int32)  # junk past each row
    lens = np.zeros(len(rows), dtype=np.int32)
    for i, r in enumerate(rows):
        tables[i, :len(r)] = r
        lens[i] = (len(r) - 1) * BS + int(rng.integers(1, BS + 1))
    return lens, tables, rows


@pytest.mark.parametrize("seed", range(40))
def test_levels_cover_each_rows_pages_once(seed):
    rng = np.random.default_rng(seed)
    lens, tables, rows = random_batch(rng, int(rng.integers(0, 5)), int(rng.integers(1, 4)))
    sp = find_shared_prefixes(lens, tables, BS)
    skip = np.zeros(len(rows), dtype=np.int64) if sp is None else sp.skip_pages
    indptr, indices, last = paged_kv_arrays(lens, tables, BS, skip)
    head = {}
    if sp is not None:
        for g in range(sp.num_groups):
            pages = sp.kv_indices[sp.kv_indptr[g]:sp.kv_indptr[g + 1]].tolist()
            members = sp.rows[sp.qo_indptr[g]:sp.qo_indptr[g + 1]]
            assert len(members) >= 2 and pages
            for r in members:
                head[int(r)] = pages
        saved = sum((sp.qo_indptr[g + 1] - sp.qo_indptr[g] - 1)
                    * (sp.kv_indptr[g + 1] - sp.kv_indptr[g]) for g in range(sp.num_groups))
        assert sp.saved_tokens == saved * BS
        assert sorted(sp.rows.tolist()) == sorted(set(sp.rows.tolist()))
    for i, r in enumerate(rows):
        own = indices[indptr[i]:indptr[i + 1]].tolist()
        assert own, "every row keeps its last page"
        assert head.get(i, []) + own == r  # the two levels are the row's pages, in order
        assert len(head.get(i, [])) == skip[i]
        assert r[-1] in own
    full = paged_kv_arrays(lens, tables, BS)
    assert np.array_equal(full[2], last)  # the last page's length does not change


def test_groups_take_the_longest_prefix_all_members_share():
    # rows 0, 2, 3 share pages 7, 8 (row 3 also 9); row 1 is alone; row 4 shares only 7
    tables = np.array([[7, 8, 20, 0], [30, 31, 0, 0], [7, 8, 21, 0], [7, 8, 9, 22], [7, 23, 0, 0]],
                      dtype=np.int32)
    lens = np.array([3, 2, 3, 4, 2], dtype=np.int32) * BS
    sp = find_shared_prefixes(lens, tables, BS)
    assert sp.num_groups == 1
    assert sorted(sp.rows.tolist()) == [0, 2, 3, 4]
    assert sp.kv_indices.tolist() == [7]  # row 4 shares only the first page
    assert sp.skip_pages.tolist() == [1, 0, 1, 1, 1]
    sp = find_shared_prefixes(lens[:4], tables[:4], BS)
    assert sp.kv_indices.tolist() == [7, 8]
    assert sp.saved_tokens == 2 * 2 * BS


def test_nothing_shared_or_only_last_pages():
    tables = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int32)
    assert find_shared_prefixes(np.array([20, 20, 20]), tables, BS) is None
    # two rows on the same single page: that page holds this step's token, never shared
    same = np.array([[1, 0], [1, 0]], dtype=np.int32)
    assert find_shared_prefixes(np.array([5, 5]), same, BS) is None


def test_policy_weighs_saved_bytes(monkeypatch):
    monkeypatch.setenv("LOCALSERVE_CASCADE", "1")
    plan = check_plan(BS, 100, rows=4, shared=3)
    saved = 3 * 3 * BS  # (4 - 1) rows x 3 pages
    assert CascadePolicy(1000, min_saved_bytes=saved * 1000).shared_prefixes(plan) is not None
    assert CascadePolicy(1000, min_saved_bytes=saved * 1000 + 1).shared_prefixes(plan) is None
    assert CascadePolicy(1000).shared_prefixes(plan) is None  # far below the 2 GiB default
    monkeypatch.setenv("LOCALSERVE_CASCADE", "force")
    assert CascadePolicy(1000).shared_prefixes(plan) is not None
    assert CascadePolicy(1000).eager
    monkeypatch.delenv("LOCALSERVE_CASCADE")  # "auto" by default: on, cascade graphs only
    auto = CascadePolicy(1000, min_saved_bytes=0)
    assert auto.enabled and not auto.eager
    assert auto.shared_prefixes(plan) is not None and auto.steps == 1
    auto.decline(plan)  # no graph for the step: it reads every row's pages
    assert auto.shared_prefixes(plan) is None and auto.steps == 0 and auto.saved_tokens == 0
    monkeypatch.setenv("LOCALSERVE_CASCADE", "0")
    assert CascadePolicy(1000, min_saved_bytes=0).shared_prefixes(plan) is None


def test_check_plan_rows_share_all_but_their_last_page():
    plan = check_plan(BS, 100, rows=4, shared=3)
    sp = find_shared_prefixes(plan.seq_lens, plan.block_tables, BS)
    assert sp.num_groups == 1 and sp.kv_indices.tolist() == [0, 1, 2]
    assert (plan.slot_mapping // BS == plan.block_tables[:, 3]).all()
    assert plan.is_decode_only


@pytest.mark.parametrize("seed", range(20))
def test_graph_padding_keeps_groups_and_permutes_every_row(seed):
    """A cascade graph's level 0 in fixed shapes (GraphCascade.pad): the real groups first,
    then empty ones; every row of the padded batch exactly once, grouped rows first in group
    order; the mask names exactly the grouped rows."""
    rng = np.random.default_rng(100 + seed)
    sp = None
    while sp is None:  # a draw with at least one group
        lens, tables, rows = random_batch(rng, int(rng.integers(1, 5)), int(rng.integers(0, 4)))
        sp = find_shared_prefixes(lens, tables, BS)
    bucket = len(rows) + int(rng.integers(0, 9))  # pad rows past the plan's
    groups = graph_max_groups(bucket)
    gc = GraphCascade.pad(sp, bucket, groups, BS)
    g = sp.num_groups
    assert len(gc.qo_indptr) == len(gc.kv_indptr) == groups + 1
    assert np.array_equal(gc.qo_indptr[: g + 1], sp.qo_indptr)
    assert np.array_equal(gc.kv_indptr[: g + 1], sp.kv_indptr)
    assert (gc.qo_indptr[g:] == sp.qo_indptr[-1]).all()  # empty groups: no rows, no pages
    assert (gc.kv_indptr[g:] == sp.kv_indptr[-1]).all()
    assert np.array_equal(gc.kv_lens, np.diff(gc.kv_indptr) * BS)
    assert sorted(gc.rows.tolist()) == list(range(bucket))
    n = len(sp.rows)
    assert np.array_equal(gc.rows[:n], sp.rows)
    assert gc.mask[:n].all() and not gc.mask[n:].any()


def test_graph_dummy_puts_every_row_in_one_group_over_one_page():
    gc = GraphCascade.dummy(8, graph_max_groups(8), BS, scratch_block=77)
    assert gc.qo_indptr.tolist() == [0, 8, 8, 8, 8]
    assert gc.kv_indptr.tolist() == [0, 1, 1, 1, 1]
    assert gc.kv_indices.tolist() == [77]
    assert gc.mask.all() and gc.rows.tolist() == list(range(8))


def test_cascade_graph_buckets_every_64_and_the_largest():
    from localserve.backends.cuda.graphs import cascade_graph_buckets, default_buckets

    assert cascade_graph_buckets(default_buckets(512)) == (64, 128, 192, 256, 320, 384, 448, 512)
    assert cascade_graph_buckets(default_buckets(100)) == (64, 100)
    assert cascade_graph_buckets(default_buckets(32)) == (32,)
    assert cascade_graph_buckets(default_buckets(8)) == ()
