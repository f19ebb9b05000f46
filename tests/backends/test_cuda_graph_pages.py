"""The decode graphs' FlashInfer page buffers (backends/cuda/flashinfer_graphs.py), host half:
what lands in the device buffers each step, and when a step re-plans. FlashInfer's wrappers
need a GPU, so a recorder stands in for `att._plan_decode` here; the GPU half (tokens with the
memo and with fixed plans equal re-planning every step) is benchmarks/scripts/host_profile.py's
memo_check on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from localserve.backends.cuda import flashinfer_graphs as FG
from localserve.backends.cuda.flashinfer_attention import paged_kv_arrays
from localserve.backends.cuda.staging import HostStaging

BS = 4  # page size


class Recorder:
    """The slice of FlashInferPagedAttention that fill() calls, planning into a list."""

    def __init__(self) -> None:
        self.plans = []

    def _host(self, a, staging):
        return torch.from_numpy(np.ascontiguousarray(a)) if staging is None else staging.host(a)

    def _plan_decode(self, w, indptr, indices, last, block_size, sliding, no_split=False):
        # what the graph-mode wrapper's plan reads from the host and copies into its buffers
        self.plans.append((w, indptr.clone(), no_split))
        w.indptr.copy_(indptr)
        w.last_page_len.copy_(last)
        w.indices[:len(indices)].copy_(indices)


def meta_for(pages: FG.GraphPages, kinds=(False,)):
    from localserve.backends.cuda.flashinfer_attention import FlashInferMetadata

    return FlashInferMetadata(slot_mapping=torch.zeros(0), wrappers={k: pages for k in kinds},
                              block_size=BS, page_sets=[(pages, kinds)])


def step(rows: int, lens: list[int]):
    width = 16
    tables = np.arange(rows * width, dtype=np.int32).reshape(rows, width)[:, ::-1].copy()
    return np.asarray(lens, dtype=np.int32), tables


@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("mode", ["exact", "headroom", "fixed"])
def test_pages_land_in_the_buffers_and_plans_follow_the_memo(mode, pinned):
    att = Recorder()
    rows = 3
    pages = FG.GraphPages.zeros(rows, 24, "cpu", mode=mode)
    meta = meta_for(pages, kinds=(False, True))
    staging = HostStaging(torch.device("cpu"), enabled=pinned) if pinned else None
    # lengths per step: the same pages; a row crosses into a new page; the same again; all
    # grow; then row 1 outgrows the first plan's HEADROOM_PAGES pages of headroom
    steps = [[5, 1, 8], [6, 2, 8], [6, 2, 9], [7, 3, 10], [8, 4, 12],
             [8, 5 + BS * FG.HEADROOM_PAGES, 12]]
    for lens in steps:
        lens, tables = step(rows, lens)
        if staging is not None:
            staging.begin()
        FG.fill(att, meta, lens, tables, staging)
        if staging is not None:
            staging.end()
        # whatever was planned, the buffers hold the step's own pages
        indptr, indices, last = paged_kv_arrays(lens, tables, BS)
        assert pages.indptr.tolist() == indptr.tolist()
        assert pages.last_page_len.tolist() == last.tolist()
        assert pages.indices[:len(indices)].tolist() == indices.tolist()
    # two wrappers (full, sliding) read the one page list: each plan is made for both
    assert len(att.plans) % 2 == 0
    planned = [p[1].tolist() for p in att.plans[::2]]
    assert all(p[2] is (mode == "fixed") for p in att.plans)
    if mode == "fixed":  # planned once (the first fill stands for the capture's)
        assert len(planned) == 1
    elif mode == "exact":  # again whenever a row's page count changes
        assert planned == [[0, 2, 3, 5], [0, 2, 3, 6], [0, 2, 12, 15]]
    else:  # headroom: planned HEADROOM_PAGES ahead; again only when a row outgrows that
        h = FG.HEADROOM_PAGES
        assert planned == [[0, 2 + h, 3 + 2 * h, 5 + 3 * h], [0, 2 + h, 12 + 2 * h, 15 + 3 * h]]


def test_graph_plan_mode(monkeypatch):
    from localserve.backends.cuda.flashinfer_attention import FlashInferPagedAttention

    att = FlashInferPagedAttention.__new__(FlashInferPagedAttention)
    att.device, att.num_kv_heads, att.tensor_cores = torch.device("cpu"), 8, True
    for var in ("LOCALSERVE_FI_NO_SPLIT_MIN", "LOCALSERVE_FI_HEADROOM"):
        monkeypatch.delenv(var, raising=False)
    assert att.graph_plan_mode(1) == "headroom"
    assert att.graph_plan_mode(32) == "fixed"  # 256 CTAs: the GPU is full without splits
    monkeypatch.setenv("LOCALSERVE_FI_HEADROOM", "0")
    assert att.graph_plan_mode(1) == "exact"
    monkeypatch.setenv("LOCALSERVE_FI_NO_SPLIT_MIN", "0")
    assert att.graph_plan_mode(1) == "fixed"
    att.tensor_cores = False  # the CUDA-core decode kernel needs a plan of the true pages
    assert att.graph_plan_mode(512) == "exact"
