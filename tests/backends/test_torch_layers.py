"""The torch_common building blocks: quantized linears and rotary tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from localserve.backends.torch_common.layers import (
    DenseLinear,
    Int4Linear,
    Int8GroupLinear,
    Int8Linear,
    make_linear,
)
from localserve.backends.torch_common.rope import RotaryTable, apply_rotary, inv_frequencies
from localserve.models.config import RopeScaling


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    """GGML Q8_0 round trip: int8 with one absmax scale per 32 inputs."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    return (torch.round(g / d) * d).reshape(n, k)


def test_int8_group_linear_reproduces_q8_0_weights():
    torch.manual_seed(0)
    # a few loud blocks per row, as in real embedding rows: one scale per row then fits badly
    loud = 1.0 + 9.0 * (torch.rand(96, 8, 1) < 0.1)
    w = _q8_0((torch.randn(96, 8, 32) * loud).reshape(96, 256))
    layer = Int8GroupLinear(w, row_lookup=True)
    rows = torch.tensor([0, 5, 95])
    # the row lookup (tied embeddings) is exact
    torch.testing.assert_close(layer.rows(rows, torch.float32), w[rows], rtol=1e-6, atol=1e-6)
    x = torch.randn(4, 256).bfloat16().float()
    ref = x @ w.t()
    # only bf16 scales and outputs separate it from the exact product
    err = (layer(x) - ref).norm() / ref.norm()
    err_row = (Int8Linear(w)(x) - ref).norm() / ref.norm()
    assert err < 5e-3 and err < err_row / 3


def test_int4_and_int8_linear_are_close_to_dense():
    torch.manual_seed(1)
    w, b = torch.randn(64, 128), torch.randn(64)
    x = torch.randn(3, 128)
    ref = x @ w.t() + b
    for layer, tol in [(Int8Linear(w, b), 0.02), (Int4Linear(w, b), 0.15), (DenseLinear(w, b), 1e-6)]:
        out = layer(x)
        assert out.dtype == torch.float32 and out.shape == (3, 64)
        assert (out - ref).norm() / ref.norm() < tol, type(layer).__name__


def test_make_linear_falls_back_where_int4_cannot_pack():
    w = torch.randn(10, 48)  # 48 inputs: not a multiple of the group of 32
    assert isinstance(make_linear(w, None, "int4", torch.float32), Int8Linear)
    assert isinstance(make_linear(w, None, "q8", torch.float32), Int8Linear)
    assert isinstance(make_linear(torch.randn(16, 64), None, "q8", torch.float32), Int8GroupLinear)
    with pytest.raises(AssertionError):
        make_linear(w, None, "fp8", torch.float32)


@pytest.mark.parametrize("scaling", [None, RopeScaling("llama3", 8.0, 1.0, 4.0, 256),
                                     RopeScaling("linear", 4.0)])
def test_rotary_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, theta = 32, 500000.0
    rope = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        rope = {"rope_type": scaling.kind, "rope_theta": theta, "factor": scaling.factor}
        if scaling.kind == "llama3":
            rope.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256)
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                      rope_parameters=rope, max_position_embeddings=8192)
    hf = LlamaRotaryEmbedding(cfg)
    torch.testing.assert_close(inv_frequencies(head_dim, theta, scaling), hf.inv_freq, rtol=0, atol=0)

    positions = torch.tensor([0, 1, 7, 300, 5000])
    q = torch.randn(len(positions), 4, head_dim)
    cos, sin = hf(q, positions[None])
    ref, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos, sin)
    table = RotaryTable(head_dim, theta, scaling, initial=16)  # grows past 16 on lookup
    c, s = table.lookup(positions, int(positions.max()))
    torch.testing.assert_close(apply_rotary(q, c, s), ref[0].transpose(0, 1), rtol=0, atol=1e-6)
    assert np.isfinite(table.cos.numpy()).all()
