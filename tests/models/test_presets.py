"""random:NAME presets: true shapes, deterministic seeds, and tiny models that generate varied text."""

from __future__ import annotations

import math

import numpy as np
import pytest

from localserve.errors import ModelLoadError
from localserve.models.gguf_loader import expected_tensor_names
from localserve.models.loader import load_weights
from localserve.models.presets import PRESETS, load_preset
from localserve.models.weights import RandomTensor
from tests.models.numpy_reference import greedy

TINY = [n for n in PRESETS if n.startswith("tiny-")]


def test_llama_3_1_8b_shapes():
    w = load_weights("random:llama-3.1-8b")
    c = w.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (4096, 32, 32, 8, 128)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta) == (14336, 128256, 500000.0)
    s = c.rope_scaling
    assert (s.kind, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position) == (
        "llama3",
        8.0,
        1.0,
        4.0,
        8192,
    )
    assert not c.tie_word_embeddings and w.tensors["output.weight"].shape == (128256, 4096)
    assert w.tensors["blk.31.attn_k.weight"].shape == (1024, 4096)
    assert w.tensors["blk.0.ffn_down.weight"].shape == (4096, 14336)
    # about 8.0B parameters, none of them materialized
    n = sum(math.prod(t.shape) for t in w.tensors.values())
    assert 8.0e9 < n < 8.1e9
    assert all(isinstance(t, RandomTensor) for t in w.tensors.values())


def test_qwen3_0_6b_shapes():
    c = load_weights("random:qwen3-0.6b").config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (1024, 28, 16, 8, 128)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta) == (3072, 151936, 1e6)
    assert c.tie_word_embeddings and c.qk_norm and c.q_size == 2048


def test_gemma_3_270m_matches_the_default_model_facts():
    w = load_weights("random:gemma-3-270m")
    c = w.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        18,
        640,
        4,
        1,
        256,
        262144,
    )
    assert [i for i, s in enumerate(c.layer_is_sliding) if not s] == [5, 11, 17]
    assert (c.sliding_window, c.rope_local_theta, c.rope_theta) == (512, 10_000.0, 1e6)
    assert c.qk_norm and c.post_norms and c.tie_word_embeddings and c.hidden_act == "gelu_tanh"
    assert len(w.tensors) == 236  # as many as the real GGUF holds


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_exactly_the_expected_tensors(name):
    w = load_preset(name)
    assert list(w.tensors) == expected_tensor_names(w.config)
    assert w.source == f"random:{name}"
    for tname, t in w.tensors.items():
        assert (t.fill == 1.0) == tname.endswith("norm.weight"), tname


def test_seeds_are_deterministic_and_distinct():
    a, b = load_preset("tiny-llama"), load_preset("tiny-llama")
    np.testing.assert_array_equal(a.dense("blk.0.attn_q.weight"), b.dense("blk.0.attn_q.weight"))
    seeds = [t.seed for t in a.tensors.values()]
    assert len(set(seeds)) == len(seeds)
    assert not np.array_equal(a.dense("blk.0.attn_q.weight")[:16], a.dense("blk.1.attn_q.weight")[:16])


def test_tiny_gemma3_window_matters_in_short_tests():
    c = load_preset("tiny-gemma3").config
    assert c.num_layers == 6 and c.sliding_window == 16 and c.layer_is_sliding[-1] is False


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_generate_varied_greedy_tokens(name):
    w = load_preset(name)
    out = greedy(w, [1, 5, 9, 13], 24)
    assert len(set(out)) >= 6, out
    assert all(0 <= t < w.config.vocab_size for t in out)


def test_unknown_preset_and_reference():
    with pytest.raises(ModelLoadError, match="unknown preset.*tiny-llama"):
        load_weights("random:nope")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_weights("/nonexistent/model.gguf")
