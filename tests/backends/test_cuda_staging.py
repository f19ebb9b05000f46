"""HostStaging (backends/cuda/staging.py): the ring of host buffers per-step inputs pass through,
and the cuda backend on device "cpu" giving the same tokens with staging on and off."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_host_values_and_dtypes():
    from localserve.backends.cuda.staging import HostStaging

    st = HostStaging(torch.device("cpu"), enabled=True, capacity=256)
    st.begin()
    a = st.host(np.array([3, 1, 2], np.int64))
    b = st.host(np.array([5, 6], np.int64), torch.int32)
    assert a.dtype == torch.long and a.tolist() == [3, 1, 2]
    assert b.dtype == torch.int32 and b.tolist() == [5, 6]
    assert a.data_ptr() % 64 == 0 and b.data_ptr() % 64 == 0
    d = st.to_device(np.array([[1, 2], [3, 4]], np.int32))
    assert d.shape == (2, 2) and d.tolist() == [[1, 2], [3, 4]]
    st.host(np.array([9, 9], np.int32))  # would rewrite d if to_device returned a view
    assert d.tolist() == [[1, 2], [3, 4]]
    dst = torch.zeros(4, dtype=torch.long)
    st.copy_to(dst, np.arange(4, dtype=np.int32))
    assert dst.tolist() == [0, 1, 2, 3]
    assert st.end() is None  # no events off the GPU


def test_ring_keeps_a_step_until_depth_steps_later():
    from localserve.backends.cuda.staging import HostStaging

    st = HostStaging(torch.device("cpu"), enabled=True, depth=2, capacity=256)
    st.begin()
    first = st.host(np.arange(8, dtype=np.int64))
    st.end()
    st.begin()
    second = st.host(np.full(8, 7, np.int64))
    st.end()
    assert first.tolist() == list(range(8)), "the next step rewrote the previous step's inputs"
    assert first.data_ptr() != second.data_ptr()
    st.begin()  # depth steps on: slot 0 comes round again and is reused
    third = st.host(np.full(8, -1, np.int64))
    assert third.data_ptr() == first.data_ptr()
    assert second.tolist() == [7] * 8


def test_full_slot_grows_without_touching_earlier_tensors():
    from localserve.backends.cuda.staging import HostStaging

    st = HostStaging(torch.device("cpu"), enabled=True, capacity=128)
    st.begin()
    small = st.host(np.arange(4, dtype=np.int64))
    big = st.host(np.arange(1000, dtype=np.int32))  # 4000 bytes > 128
    assert big.tolist() == list(range(1000))
    assert small.tolist() == [0, 1, 2, 3]
    again = st.host(np.arange(3, dtype=np.int64))
    assert again.tolist() == [0, 1, 2] and big.tolist() == list(range(1000))


def test_disabled_is_pageable_numpy(monkeypatch):
    from localserve.backends.cuda.staging import HostStaging

    monkeypatch.setenv("LOCALSERVE_PINNED", "0")
    st = HostStaging(torch.device("cpu"))
    assert not st.enabled and not st.pinned
    st.begin()
    t = st.host(np.array([1, 2], np.int32), torch.long)
    assert t.dtype == torch.long and t.tolist() == [1, 2]
    with pytest.raises(AssertionError):
        st.empty((2,), torch.long)
    st.set_enabled(True)
    assert st.enabled and not st.pinned  # no pinning without CUDA


@pytest.mark.parametrize("overlap", [False, True])
def test_backend_tokens_equal_with_staging_on_and_off(overlap, monkeypatch):
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import tiny_weights
    from localserve.engine.backend import BackendConfig
    from localserve.engine.llm_engine import EngineConfig, LLMEngine
    from localserve.engine.sampling_params import SamplingParams

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "0")
    weights = tiny_weights("tiny-gemma3")
    vocab = weights.config.vocab_size
    prompts = [[(5 * i + 11 * j) % (vocab - 3) + 3 for j in range(n)] for i, n in enumerate((6, 19, 33))]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=4, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)]
    outs = {}
    for pinned in ("0", "1"):
        monkeypatch.setenv("LOCALSERVE_PINNED", pinned)
        be = CUDABackend(device="cpu")
        be.load(weights, BackendConfig(dtype="float32", max_num_batched_tokens=64, max_num_seqs=8))
        assert be.staging.enabled == (pinned == "1")
        eng = LLMEngine(be, weights.config, None, EngineConfig(
            block_size=16, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64,
            async_scheduling=overlap))
        assert eng.async_scheduling == overlap
        res = eng.generate(prompts, params)
        eng.check_integrity()
        outs[pinned] = [[list(s.output_token_ids) for s in seqs] for seqs in res]
        if pinned == "1":
            assert any(s.used > 0 for s in be.staging._slots), "nothing went through staging"
        be.close()
    assert outs["1"] == outs["0"]
