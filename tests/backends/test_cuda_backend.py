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


@pytest.mark.parametrize("attention", ["triton", "torch"])
def test_conformance_on_cpu_device(attention, monkeypatch):
    """The backend's own code path (weights, device rope, step inputs, attention, sampling)
    against CPUBackend: same greedy tokens, batched == alone, prefix hit == cold."""
    if attention == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import run_conformance

    monkeypatch.setenv("LOCALSERVE_ATTENTION", attention)
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


# -- on a GPU (run by scripts/gpu_bench.py on the device machine) ----------------------

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("attention", ["flashinfer", "triton"])
def test_gpu_bf16_conformance(attention, monkeypatch):
    if attention == "flashinfer":
        pytest.importorskip("flashinfer")
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import run_conformance

    monkeypatch.setenv("LOCALSERVE_ATTENTION", attention)
    report = run_conformance(CUDABackend, models=("tiny-llama", "tiny-gemma3"), dtype="bfloat16",
                             logits_rtol=3e-2)
    assert report.ok, "\n".join(report.lines())


@gpu
def test_gpu_fp32_conformance_through_load_model():
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import run_conformance

    report = run_conformance(CUDABackend, models=("tiny-llama", "tiny-gemma3", "tiny-qwen3"))
    assert report.ok, "\n".join(report.lines())
