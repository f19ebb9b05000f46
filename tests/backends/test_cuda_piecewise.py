"""Piecewise graphs (backends/cuda/piecewise.py) on the CPU device: the pieces run uncaptured
over the same static buffers, in the same order, with the attention between them, so the split
of each layer, the padding to a bucket and the buffers' wiring are what these check. The
captures themselves run on the GPU (conformance.py and the benchmarks)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import numpy as np
import pytest
import torch

from localserve.engine.backend import BackendConfig

pytest.importorskip("triton", reason="triton is not installed")


def test_buckets_cover_every_step_up_to_the_cap():
    from localserve.backends.cuda.piecewise import max_tokens_default, piecewise_buckets

    b = piecewise_buckets(2048)
    assert b[0] == 16 and b[-1] == 2048 and list(b) == sorted(set(b))
    assert all(y - x <= 128 for x, y in zip(b, b[1:]))
    # padding past 256 tokens stays under an eighth of the step
    assert all((y - x) / x <= 0.125 for x, y in zip(b, b[1:]) if x >= 256)
    assert piecewise_buckets(100)[-1] == 100
    assert max_tokens_default(512) == 512 and max_tokens_default(1 << 20) == 2048


def test_a_bad_max_tokens_setting_falls_back_to_the_default(monkeypatch):
    from localserve.backends.cuda.piecewise import DEFAULT_MAX_TOKENS, max_tokens_default

    monkeypatch.setenv("LOCALSERVE_PIECEWISE_MAX_TOKENS", "lots")
    assert max_tokens_default(1 << 20) == DEFAULT_MAX_TOKENS
    monkeypatch.setenv("LOCALSERVE_PIECEWISE_MAX_TOKENS", "512")
    assert max_tokens_default(1 << 20) == 512 and max_tokens_default(100) == 100


def _backend(model: str, monkeypatch, piecewise: bool):
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import tiny_weights

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "1")
    monkeypatch.setattr(CUDABackend, "_use_piecewise", lambda self: piecewise)
    monkeypatch.setenv("LOCALSERVE_PIECEWISE_MAX_TOKENS", "48")
    be = CUDABackend(device="cpu")
    be.load(tiny_weights(model), BackendConfig(dtype="float32", max_num_batched_tokens=64,
                                               max_num_seqs=8))
    be.init_kv(24, 16)
    return be


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
@torch.inference_mode()
def test_pieces_give_the_eager_forwards_logits(model, monkeypatch):
    """A prefill step and a decode step, each padded to a bucket: the same logits and the same
    K/V at the step's slots as the eager forward (those slots are zeroed between the two, so
    the pieces must write them), and the pad rows write K/V to the scratch page only."""
    from localserve.backends.cuda.inputs import dummy_plans, step_inputs

    be = _backend(model, monkeypatch, piecewise=True)
    pw = be.piecewise
    assert pw is not None and pw.buckets[-1] == 48
    prefill, decode = dummy_plans(np.array([9, 14, 3]), 16, be.model.cfg.vocab_size)
    for plan in (prefill, decode):
        assert pw.bucket_for(plan.num_tokens) > plan.num_tokens  # padded rows
        cache = torch.stack([torch.stack(kv) for kv in be.kv]).clone()
        eager = be.model.forward(step_inputs(plan, be.model, be.rope, be.device), be.kv)
        after_eager = torch.stack([torch.stack(kv) for kv in be.kv]).clone()
        slots = torch.from_numpy(plan.slot_mapping)
        for k_cache, v_cache in be.kv:
            k_cache[slots] = 0
            v_cache[slots] = 0
        pw.prepare(plan)
        logits = pw.replay()
        torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
        after = torch.stack([torch.stack(kv) for kv in be.kv])
        scratch = be.num_blocks * 16
        # every real slot as the eager step wrote it; nothing else but the scratch page moved
        torch.testing.assert_close(after[:, :, :scratch], after_eager[:, :, :scratch])
        written = np.zeros(scratch, dtype=bool)
        written[plan.slot_mapping] = True
        assert torch.equal(after[:, :, :scratch][:, :, ~written], cache[:, :, :scratch][:, :, ~written])


def test_engine_through_piecewise_equals_the_cpu_reference(monkeypatch):
    """The backend routes prefill and mixed steps to the pieces (overlap placeholders filled
    in their static token rows): greedy == the CPU reference, batched == alone, hit == cold."""
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import run_conformance

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "1")
    monkeypatch.setenv("LOCALSERVE_PIECEWISE_MAX_TOKENS", "64")
    monkeypatch.setattr(CUDABackend, "_use_piecewise", lambda self: True)
    backends = []

    def make():
        backends.append(CUDABackend(device="cpu"))
        return backends[-1]

    # the fused kernels run in Triton's interpreter here, a program at a time: keep it small
    report = run_conformance(make, models=("tiny-llama",), max_new=6, lengths=(6, 19, 33))
    assert report.ok, "\n".join(report.lines())
    assert all(b.piecewise is not None for b in backends)
    assert sum(b.piecewise.steps for b in backends) > 10
