"""The CUDA backend's batch-shape recommendation and the decode-graph buckets past 512."""

import pytest

torch = pytest.importorskip("torch")

from localserve.backends.cuda import graphs as graphs_mod  # noqa: E402
from localserve.backends.cuda.batch_shape import (  # noqa: E402
    MAX_GRAPH_BATCH, MAX_NUM_SEQS, RECOMMENDED_MAX_NUM_SEQS, BatchShape, recommend_batch_shape)
from localserve.backends.cuda.graphs import default_buckets  # noqa: E402


def test_buckets_reach_1024_in_steps_of_64():
    b = default_buckets(1024)
    assert b[-1] == 1024 and 768 in b and 512 in b
    assert all(y - x <= 64 for x, y in zip(b, b[1:]))
    assert default_buckets(512)[-1] == 512 and max(default_buckets(600)) == 600


def test_recommendation_without_kv_is_the_measured_default():
    s = recommend_batch_shape()
    assert s == BatchShape(RECOMMENDED_MAX_NUM_SEQS, s.max_num_batched_tokens)
    assert s.max_num_seqs <= MAX_NUM_SEQS
    assert MAX_GRAPH_BATCH == graphs_mod.SAFE_MAX_BATCH  # the retry falls back to what captures
    assert s.max_num_batched_tokens >= s.max_num_seqs


def test_recommendation_is_capped_by_the_kv_pool():
    # 426k tokens (the H100 pool for llama-3.1-8b) holds 1,024 sequences of 256 tokens
    assert recommend_batch_shape(426_160).max_num_seqs == min(1024, RECOMMENDED_MAX_NUM_SEQS)
    # a small pool: 40,000 tokens / 256 = 156 -> 128 (a multiple of 64)
    assert recommend_batch_shape(40_000).max_num_seqs == 128
    assert recommend_batch_shape(1_000).max_num_seqs == 64  # never below one bucket of 64
    assert recommend_batch_shape(None, max_num_seqs=4096).max_num_seqs == MAX_NUM_SEQS
    # the token budget always fits every running decode
    assert recommend_batch_shape(None, max_num_seqs=1024, max_num_batched_tokens=512) \
        .max_num_batched_tokens == 1024


def test_capture_retries_with_buckets_up_to_512(monkeypatch):
    tried = []

    class Failing:
        def __init__(self, model, attention, rope, kv, buckets, *a, **k):
            tried.append(tuple(buckets))
            if max(buckets) > graphs_mod.SAFE_MAX_BATCH:
                raise RuntimeError("workspace too small")
            self.buckets = tuple(buckets)

    monkeypatch.setattr(graphs_mod, "DecodeGraphs", Failing)
    g = graphs_mod.capture_or_none(None, None, None, None, default_buckets(1024), 16, 8, 0, None)
    assert g is not None and g.buckets[-1] == 512
    assert [max(t) for t in tried] == [1024, 512]
    tried.clear()
    monkeypatch.setattr(graphs_mod, "SAFE_MAX_BATCH", 0)  # nothing left to retry with
    assert graphs_mod.capture_or_none(None, None, None, None, (1, 2), 16, 8, 0, None) is None
    assert tried == [(1, 2)]


def test_backend_graphs_stop_at_max_graph_batch_and_recommend_from_the_pool():
    from localserve.backends.cuda import CUDABackend

    be = CUDABackend(device="cpu")
    assert be.recommended_batch_shape() == recommend_batch_shape()  # pool not sized yet
    be.num_blocks, be.block_size = 2_500, 16  # 40,000 tokens
    assert be.recommended_batch_shape().max_num_seqs == 128
    assert default_buckets(min(1024, MAX_GRAPH_BATCH))[-1] == MAX_GRAPH_BATCH
