"""FP8 weights (backends/cuda/fp8.py): the row-wise scaling of weights and activations around
torch._scaled_mm, checked on the CPU (torch runs _scaled_mm there too); the H100 run is in
benchmarks/scripts/gpu_bench.py --fp8 (BENCHMARKS.md)."""

import numpy as np
import pytest
import torch

from localserve.backends.cuda.fp8 import FP8_MAX, Fp8Linear, quantize_rows, to_fp8
from localserve.backends.torch_common.layers import DenseLinear
from localserve.backends.torch_common.weights import LayerWeights


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    x = torch.randn(7, 64) * torch.logspace(-3, 3, 7)[:, None]
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 1)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((7,), FP8_MAX))
    rel = ((q.float() * s - x).abs() / x.abs().amax(dim=1, keepdim=True)).max()
    assert rel < 2 ** -4  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_the_product_of_the_dequantized_operands(bias):
    torch.manual_seed(0)
    w = torch.randn(48, 96, dtype=torch.bfloat16)
    b = torch.randn(48, dtype=torch.bfloat16) if bias else None
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    y = Fp8Linear(w, b)(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.bfloat16
    xq, sx = quantize_rows(x.reshape(-1, 96))
    wq, sw = quantize_rows(w)
    ref = (xq.float() * sx) @ (wq.float() * sw).t()
    if bias:
        ref = ref + b.float()
    ref = ref.reshape(2, 5, 48)
    assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 output rounding
    dense = x.float() @ w.float().t() + (b.float() if bias else 0)
    assert (y.float() - dense).abs().max() <= 0.08 * dense.abs().max()  # e4m3's own error


def test_to_fp8_converts_the_layer_linears_it_can():
    def dense(n, k):
        return DenseLinear(torch.randn(n, k, dtype=torch.bfloat16))

    layer = LayerWeights(attn_norm=torch.ones(32), qkv=dense(64, 32), q_norm=None, k_norm=None,
                         o_proj=dense(32, 32), post_attn_norm=None, ffn_norm=torch.ones(32),
                         gate_up=dense(128, 32), down=dense(32, 40),  # 40: not a multiple of 16
                         post_ffw_norm=None)

    class W:
        layers = [layer]

    assert to_fp8(W) == 3
    assert isinstance(layer.qkv, Fp8Linear) and isinstance(layer.gate_up, Fp8Linear)
    assert isinstance(layer.down, DenseLinear) and layer.down.weight is not None
    assert layer.qkv.out_features == 64


def test_kv_pages_in_e4m3_saturate_instead_of_overflowing():
    """torch's cast to e4m3fn turns overflow into NaN; the KV writes clamp to +-448 first."""
    from localserve.backends.torch_common.attention import to_cache_dtype

    x = torch.tensor([1000.0, -1e6, 3.3, 0.0], dtype=torch.bfloat16)
    y = to_cache_dtype(x, torch.float8_e4m3fn)
    assert y.dtype == torch.float8_e4m3fn
    assert y.float().tolist()[:2] == [FP8_MAX, -FP8_MAX] and not torch.isnan(y.float()).any()
    assert abs(y.float()[2].item() - 3.3) < 0.2  # 3 mantissa bits
    assert to_cache_dtype(x, torch.bfloat16) is not None and to_cache_dtype(x, torch.bfloat16).equal(x)


def test_fp8_kv_cache_without_an_fp8_gpu_keeps_the_compute_dtype_and_says_so(monkeypatch):
    """The cuda backend's code on the CPU device (no FP8 GPU): bf16 pages and a note."""
    pytest.importorskip("triton", reason="triton is not installed")
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import tiny_weights
    from localserve.engine.backend import BackendConfig

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    be = CUDABackend(device="cpu")
    be.load(tiny_weights("tiny-llama"), BackendConfig(dtype="bfloat16", kv_dtype="fp8",
                                                      max_num_batched_tokens=32, max_num_seqs=2))
    assert be.kv_dtype == torch.bfloat16
    assert any(f.startswith("fp8 KV cache: needs an FP8 GPU") for f in be.fallbacks), be.fallbacks
    assert be.describe()["kv_dtype"] == "bfloat16"


def test_e4m3_pages_are_written_and_read_by_slot():
    from localserve.backends.torch_common.attention import read_pages, write_pages

    cache = torch.zeros(10, 2, 4, dtype=torch.float8_e4m3fn)
    x = torch.tensor([[[1.0, -2.0, 500.0, 0.5]] * 2] * 3, dtype=torch.bfloat16)
    slots = torch.tensor([7, 2, 4])
    write_pages(cache, slots, x)
    got = read_pages(cache, slots).float()
    assert got[:, :, 2].eq(FP8_MAX).all() and got[:, :, :2].eq(x[:, :, :2].float()).all()
    assert cache.float()[[0, 1, 3, 5, 6, 8, 9]].eq(0).all()


@pytest.mark.parametrize("kind", ["rms_norm", "add_rms_norm", "act_mul_silu", "act_mul_gelu_tanh"])
def test_fused_quantizer_gives_the_separate_quantizers_codes(kind):
    """The norm and act*mul kernels with the FP8 quantizer inside them (one launch, one pass
    less over the activations) write the codes and scales the separate quantizer writes from
    their bf16 output (Triton's interpreter here; the same kernels on the GPU)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from localserve.backends.cuda import fp8
    from localserve.backends.triton_kernels import fused as K

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 96, generator=g) * 3).bfloat16()
    w = torch.randn(96, generator=g).bfloat16()
    if kind == "rms_norm":
        ref, got = K.rms_norm(x, w, 1e-6), K.rms_norm(x, w, 1e-6, quant=True)
    elif kind == "add_rms_norm":
        r1, r2 = x.clone(), x.clone()
        d = torch.randn(5, 96, generator=g).bfloat16()
        ref, got = K.add_rms_norm(d, r1, w, 1e-6), K.add_rms_norm(d, r2, w, 1e-6, quant=True)
        assert torch.equal(r1, r2)  # the residual is updated the same way
    else:
        act = kind.removeprefix("act_mul_")
        gu = torch.randn(5, 2 * 3000, generator=g).bfloat16()  # two chunks of the quant kernel
        ref, got = K.act_mul(gu, act), K.act_mul(gu, act, quant=True)
    q, s = fp8._quantize_rows_triton(ref)
    assert got[0].dtype == fp8.FP8 and got[1].shape == (ref.shape[0], 1)
    assert torch.equal(got[1], s)
    assert torch.equal(got[0].view(torch.uint8), q.view(torch.uint8))


def test_fp8_layers_with_the_fused_quantizer_give_the_same_logits(monkeypatch):
    """A tiny llama's layers in FP8 through FusedDecoderModel: the quantizer fused into the
    norms and act*mul (default) or run on its own (LOCALSERVE_FP8_FUSED_QUANT=0) gives the
    same logits bit for bit."""
    pytest.importorskip("triton", reason="triton is not installed")
    from localserve.backends.cuda import CUDABackend, fp8
    from localserve.backends.cuda.conformance import tiny_weights
    from localserve.backends.cuda.inputs import dummy_plans, step_inputs
    from localserve.engine.backend import BackendConfig

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "1")
    # the separate quantizer as it runs on the GPU (the Triton kernel; on the CPU, fp8.py
    # takes torch's cast, whose rounding differs from the interpreter's in the last bit)
    monkeypatch.setattr(fp8, "quantize_rows", fp8._quantize_rows_triton)
    be = CUDABackend(device="cpu")
    be.load(tiny_weights("tiny-llama"), BackendConfig(dtype="bfloat16", max_num_batched_tokens=32,
                                                      max_num_seqs=2))
    be.init_kv(8, 16)
    assert to_fp8(be.model.w) > 0
    prefill, _ = dummy_plans(np.array([9, 14]), 16, be.model.cfg.vocab_size)
    logits = []
    with torch.inference_mode():
        for fused_quant in (True, False):
            be.model.fuse_quant = fused_quant
            assert be.model.quantizes(be.model.w.layers[0].qkv) is fused_quant
            step = step_inputs(prefill, be.model, be.rope, be.device)
            logits.append(be.model.forward(step, be.kv))
    assert torch.equal(logits[0], logits[1])
