"""The cuda backend's execute_async (overlap scheduling) on device "cpu": conformance with the
CPU reference, and the same tokens as the synchronous path with random sampling, logprobs and
sequences finishing mid-flight."""

from __future__ import annotations

import pytest


def test_conformance_on_cpu_device_with_overlap(monkeypatch):
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import run_conformance

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "0")
    monkeypatch.setenv("LOCALSERVE_ASYNC_SCHEDULING", "1")
    backends = []
    placeholders = []

    def make():
        be = CUDABackend(device="cpu")
        orig = be.execute_async

        def counted(plan):
            placeholders.append(len(plan.placeholder_rows) if plan.has_placeholders else 0)
            return orig(plan)

        be.execute_async = counted
        backends.append(be)
        return be

    report = run_conformance(make, models=("tiny-llama", "tiny-gemma3"))
    assert report.ok, "\n".join(report.lines())
    assert sum(placeholders) > 0, "the engine never overlapped"


@pytest.mark.parametrize("model", ["tiny-gemma3"])
def test_overlap_equals_sync_with_sampling_and_logprobs(model, monkeypatch):
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import tiny_weights
    from localserve.engine.backend import BackendConfig
    from localserve.engine.llm_engine import EngineConfig, LLMEngine
    from localserve.engine.sampling_params import SamplingParams

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "0")
    weights = tiny_weights(model)
    vocab = weights.config.vocab_size
    prompts = [[(7 * i + 3 * j) % (vocab - 3) + 3 for j in range(n)] for i, n in enumerate((5, 21, 9, 30))]
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=1, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, seed=2, max_tokens=12, ignore_eos=True,
                       logprobs=True, top_logprobs=2),
        SamplingParams(temperature=1.0, seed=3, max_tokens=7, ignore_eos=True, n=2),
    ]
    outs = {}
    for overlap in (False, True):
        be = CUDABackend(device="cpu")
        be.load(weights, BackendConfig(dtype="float32", max_num_batched_tokens=64, max_num_seqs=8))
        eng = LLMEngine(be, weights.config, None, EngineConfig(
            block_size=16, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64,
            async_scheduling=overlap))
        assert eng.async_scheduling == overlap
        res = eng.generate(prompts, params)
        eng.check_integrity()
        outs[overlap] = [[list(s.output_token_ids) for s in seqs] for seqs in res]
    assert outs[True] == outs[False]


def test_pinned_ids_ring_reuses_its_buffers_in_turn():
    """The sampled ids' host buffers come round again `depth` steps later, grown when a step
    has more rows (the engine reads a step's ids before it submits the step two after it)."""
    import torch

    from localserve.backends.cuda.overlap import PinnedIds

    ring = PinnedIds(depth=3, pin=torch.cuda.is_available())  # pinning needs a CUDA runtime
    a, b, c = ring.take(5), ring.take(70), ring.take(5)
    assert a.numel() == 5 and b.numel() == 70 and a.dtype == torch.long
    assert a.data_ptr() != b.data_ptr() != c.data_ptr()
    assert ring.take(4).data_ptr() == a.data_ptr()  # slot 0 again, big enough
    assert ring.take(200).numel() == 200  # slot 1 grows
