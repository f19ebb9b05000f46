"""The Triton GEMV (triton_kernels/gemv.py) in the interpreter: products at 1 and 2 rows with
partial blocks, bias, float32 output after the weight dtype's rounding; and the fused model
routing its small-batch linears and output layer through it, against the CPU reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from localserve.backends.triton_kernels import gemv as G  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_matches_torch(m, dtype):
    gen = torch.Generator().manual_seed(m)
    n, k = 37, 300  # neither a multiple of the blocks: masked rows and columns
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    ref = x.float() @ w.float().T
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    y = G.gemv(x, w)
    assert y.dtype == dtype and y.shape == (m, n) and _rel(y, ref) < tol
    assert _rel(G.gemv(x, w, b), ref + b.float()) < tol
    out = torch.full((m, n), float("nan"))
    G.gemv(x, w, out=out)
    assert _rel(out, ref) < tol
    assert torch.equal(out, out.to(dtype).float())  # rounded to the weight dtype, then widened


def test_gemv_takes_strided_rows_and_refuses_large_batches():
    w = torch.randn(20, 64)
    base = torch.randn(2, 100)
    x = base[:, 10:74]  # row stride 100, unit column stride: a view of a wider tensor
    assert _rel(G.gemv(x, w), x @ w.T) < 1e-6
    with pytest.raises(AssertionError):
        G.gemv(torch.randn(G.MAX_M + 1, 64), w)


@pytest.mark.parametrize("prompt", [[7], [5, 9]])
def test_fused_model_routes_small_batches_through_the_gemv(prompt, monkeypatch):
    """Every linear of a 1- or 2-row step (and the output layer, straight into float32
    logits) runs the GEMV, and the logits equal the CPU reference's."""
    from localserve.backends.cuda import CUDABackend
    from localserve.backends.cuda.conformance import logits_error, tiny_weights
    from localserve.backends.cuda.fused_model import FusedDecoderModel
    from localserve.engine.backend import BackendConfig

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "1")
    monkeypatch.setattr(FusedDecoderModel, "GEMV_MIN_ELEMENTS", 0)  # tiny weights qualify
    calls = []
    real = G.gemv

    def counted(x, w, *a, **kw):
        calls.append((x.shape[0], tuple(w.shape), kw.get("out") is not None))
        return real(x, w, *a, **kw)

    monkeypatch.setattr(G, "gemv", counted)
    be = CUDABackend(device="cpu")
    w = tiny_weights("tiny-qwen2")  # with the qkv bias
    err = logits_error(be, w, BackendConfig(dtype="float32", max_num_batched_tokens=8,
                                            max_num_seqs=1), prompt)
    assert err < 1e-5, err
    # the measured step's calls come last (the warm-up's come first): qkv, o, gate|up, down
    # per layer, then the output layer
    step = calls[-(4 * w.config.num_layers + 1):]
    assert all(rows == len(prompt) and not logits for rows, _, logits in step[:-1])
    assert step[-1] == (1, (w.config.vocab_size, w.config.hidden_size), True)


def test_gemv_off_by_environment(monkeypatch):
    from localserve.backends.cuda import CUDABackend
    from localserve.engine.backend import BackendConfig
    from localserve.models.loader import load_weights

    monkeypatch.setenv("LOCALSERVE_ATTENTION", "torch")
    monkeypatch.setenv("LOCALSERVE_FUSED", "1")
    for flag, on in (("0", False), ("1", True)):
        monkeypatch.setenv("LOCALSERVE_GEMV", flag)
        be = CUDABackend(device="cpu")
        be.load(load_weights("random:tiny-llama"), BackendConfig(dtype="float32"))
        assert (be.model.gemv is not None) is on, flag
