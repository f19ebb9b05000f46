"""The cuda backend: registry and discovery, clear failures without a GPU, and conformance with
the CPU reference through LLMEngine — on the CPU (the same backend code on device "cpu", its
attention in Triton's interpreter or torch SDPA) and, where a GPU exists, on it."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest
import torch

from localserve.backends import BackendUnavailableError, available_backends, select_backend
from localserve.engine.backend import Backend, BackendConfig
from localserve.errors import ModelLoadError
from localserve.models.loader import load_weights

HAS_GPU = torch.cuda.is_available() and torch.version.cuda is not None


def test_registered_and_protocol():
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.rocm import ROCmBackend

    names = available_backends()
    assert names["cuda"] == "localserve.backends.cuda:CUDABackend"
    assert names["rocm"] == "localserve.backends.rocm:ROCmBackend"
    assert isinstance(CUDABackend(), Backend) and isinstance(ROCmBackend(), Backend)
    assert ROCmBackend.attention_order == ("triton", "torch")


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU path")
def test_no_gpu_probe_is_empty_and_auto_falls_back_to_cpu():
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.rocm import ROCmBackend

    assert CUDABackend.probe() == [] and ROCmBackend.probe() == []
    with pytest.raises(BackendUnavailableError, match="no usable device"):
        select_backend("cuda")
    assert select_backend("auto").name == "cpu"


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU path")
def test_load_without_gpu_says_why():
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.device import gpu_unavailable_reason

    assert "CPU-only" in gpu_unavailable_reason("cuda") or "no GPU" in gpu_unavailable_reason("cuda")
    with pytest.raises(ModelLoadError, match="cuda backend cannot run here"):
        CUDABackend().load(load_weights("random:tiny-llama"), BackendConfig())


def test_out_of_memory_message_names_the_need():
    from localserve.backends.cuda.device import out_of_memory_message

    msg = out_of_memory_message("loading the weights", 16 << 30, 3 << 30, 80 << 30, "use bf16")
    assert "16.00 GiB" in msg and "3.00 GiB" in msg and "use bf16" in msg


@pytest.mark.parametrize("attention,fused", [("triton", "0"), ("torch", "0")])
def test_conformance_on_cpu_device(attention, fused, monkeypatch):
    """The backend's own code path (weights, device rope, step inputs, attention, the fused
    Triton kernels, sampling) against CPUBackend: same greedy tokens, batched == alone,
    prefix hit == cold."""
    if attention == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import run_conformance

    monkeypatch.setenv("LOCALSERVE_ATTENTION", attention)
    monkeypatch.setenv("LOCALSERVE_FUSED", fused)
    backends = []

    def make():
        backends.append(CUDABackend(device="cpu"))
        return backends[-1]

    if attention == "triton":  # the interpreter runs every program in Python: keep it small
        report = run_conformance(make, models=("tiny-gemma3",), max_new=6, lengths=(6, 19, 33))
    else:
        report = run_conformance(make, models=("tiny-llama", "tiny-gemma3"))
    assert report.ok, "\n".join(report.lines())
    assert {b.attention_name for b in backends} == {attention}
    assert {b.model.fused for b in backends} == {fused == "1"}


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-qwen3", "tiny-qwen2"])
def test_fused_kernels_match_the_cpu_reference(model, monkeypatch):
    """FusedDecoderModel (Triton norms, rope + qk-norm + KV write, act*mul; here in the
    interpreter, fp32) gives the CPU reference's logits for a prefill that spans pages."""
    pytest.importorskip("triton", reason="triton is not installed")
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import logits_error, tiny_weights

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "1")
    be = CUDABackend(device="cpu")
    w = tiny_weights(model)
    prompt = list(range(3, 40))
    err = logits_error(be, w, BackendConfig(dtype="float32", max_num_batched_tokens=8,
                                            max_num_seqs=1), prompt)
    assert be.fallbacks == [] or all("flashinfer" in f for f in be.fallbacks), be.fallbacks
    assert err < 1e-5, err


def test_fused_flag_follows_the_environment(monkeypatch):
    from localserve.backends.cuda import CUDABackend

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    for flag, want in (("0", False), ("1", True), ("auto", False)):  # auto: GPU and bf16 only
        monkeypatch.setenv("LOCALSERVE_FUSED", flag)
        be = CUDABackend(device="cpu")
        be.load(load_weights("random:tiny-llama"), BackendConfig(dtype="float32"))
        assert be.model.fused is want, flag


def test_fused_kernels_that_fail_are_dropped_before_any_request(monkeypatch):
    """A fused kernel failing in the warm-up (a broken Triton, say) turns the fused path off
    and keeps the attention; the reason is kept."""
    pytest.importorskip("triton", reason="triton is not installed")
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.triton_kernels import fused

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "1")

    def broken(*a, **k):
        raise RuntimeError("ptxas failed")

    monkeypatch.setattr(fused, "rms_norm", broken)
    be = CUDABackend(device="cpu")
    be.load(load_weights("random:tiny-llama"), BackendConfig(max_num_batched_tokens=8,
                                                             max_num_seqs=2))
    assert be.model.fused
    be.init_kv(16, 16)
    assert not be.model.fused and be.attention_name == "torch"
    assert any(f.startswith("fused kernels") and "ptxas failed" in f for f in be.fallbacks)


def test_fallback_when_an_attention_fails(monkeypatch):
    """An attention implementation that fails in the warm-up is replaced by the next one
    before any request, and the reason is kept."""
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda import backend as cuda_backend

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "triton")
    be = CUDABackend(device="cpu")
    be.load(load_weights("random:tiny-llama"), BackendConfig(max_num_batched_tokens=32))

    class Broken:
        def prepare(self, plan):
            raise RuntimeError("kernel failed to compile")

    be.model.attention = Broken()
    monkeypatch.setattr(cuda_backend.CUDABackend, "attention_order", ("triton", "torch"))
    be.init_kv(32, 16)
    assert be.attention_name == "torch"
    assert any("kernel failed to compile" in f for f in be.fallbacks)


# -- on a GPU (run by benchmarks/scripts/gpu_bench.py on the device machine) ----------------------

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("attention", ["flashinfer", "triton"])
def test_gpu_bf16_conformance(attention, monkeypatch):
    if attention == "flashinfer":
        pytest.importorskip("flashinfer")
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import run_conformance

    monkeypatch.setenv("LOCALSERVE_ATTENTION", attention)
    # head dims and GQA groups FlashInfer has kernels for
    report = run_conformance(CUDABackend, models=("tiny-llama@128/1", "tiny-gemma3@256/1",
                                                  "tiny-qwen3@128/2"), dtype="bfloat16",
                             logits_rtol=3e-2)
    assert report.ok, "\n".join(report.lines())


@gpu
def test_gpu_fp32_conformance_through_load_model():
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import run_conformance

    report = run_conformance(CUDABackend, models=("tiny-llama", "tiny-gemma3", "tiny-qwen3"))
    assert report.ok, "\n".join(report.lines())
