"""HF folder loading: name mapping, gemma norm +1, bf16/sharded safetensors, and logits that
match transformers for every supported architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from localserve.errors import MissingTensorError, ModelLoadError, UnsupportedArchitectureError
from localserve.models.config_loaders import config_from_hf
from localserve.models.hf_loader import hf_to_canonical, load_hf_folder, read_safetensors
from localserve.models.loader import load_weights
from localserve.models.weights import GGMLTensor
from tests.models.numpy_reference import forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


def _make(arch: str):
    t = transformers
    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return t.LlamaForCausalLM(t.LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling=rope))
    if arch == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**SMALL, sliding_window=None))
    if arch == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, tie_word_embeddings=True))
    if arch == "qwen3":
        return t.Qwen3ForCausalLM(t.Qwen3Config(**SMALL, tie_word_embeddings=True))
    if arch == "gemma3":
        cfg = t.Gemma3TextConfig(
            **{**SMALL, "num_hidden_layers": 6},
            sliding_window=4,
            query_pre_attn_scalar=24,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            rope_local_base_freq=100.0,
        )
        return t.Gemma3ForCausalLM(cfg)
    raise AssertionError(arch)


def _saved(arch: str, folder: Path, dtype=None, **save_kw):
    torch.manual_seed(0)
    model = _make(arch).eval()
    with torch.no_grad():  # norms/biases start at 0 or 1: perturb them so the mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **save_kw)
    return model


def _logits(model, toks):
    with torch.no_grad():
        return model(torch.tensor([toks])).logits[0].double().numpy()


TOKS = list(range(3, 15))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_logits_match_transformers(arch, tmp_path):
    model = _saved(arch, tmp_path)
    w = load_weights(str(tmp_path))
    assert w.config.architecture == arch and w.meta["format"] == "hf"
    np.testing.assert_allclose(forward(w, TOKS), _logits(model, TOKS), atol=2e-5)


@pytest.mark.slow
def test_gemma3_norms_get_plus_one_and_names_map(tmp_path):
    model = _saved("gemma3", tmp_path)
    w = load_hf_folder(tmp_path)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    pairs = {
        "blk.2.attn_norm.weight": "model.layers.2.input_layernorm.weight",
        "blk.2.post_attention_norm.weight": "model.layers.2.post_attention_layernorm.weight",
        "blk.2.ffn_norm.weight": "model.layers.2.pre_feedforward_layernorm.weight",
        "blk.2.post_ffw_norm.weight": "model.layers.2.post_feedforward_layernorm.weight",
        "blk.2.attn_q_norm.weight": "model.layers.2.self_attn.q_norm.weight",
        "blk.2.attn_k_norm.weight": "model.layers.2.self_attn.k_norm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for ours, theirs in pairs.items():
        np.testing.assert_allclose(w.dense(ours), sd[theirs] + 1.0, rtol=1e-6)
    np.testing.assert_array_equal(
        w.dense("blk.1.attn_q.weight"), sd["model.layers.1.self_attn.q_proj.weight"]
    )
    c = w.config
    assert c.tie_word_embeddings and "output.weight" not in w.tensors
    assert c.layer_is_sliding == (True,) * 5 + (False,) and c.sliding_window == 4
    assert c.rope_local_theta == 100.0 and c.rope_scaling.kind == "linear" and c.rope_scaling.factor == 8.0
    assert c.scale == pytest.approx(24**-0.5) and c.embedding_scale == pytest.approx(8.0)


@pytest.mark.slow
def test_llama_norm_names_and_config(tmp_path):
    model = _saved("llama", tmp_path)
    w = load_hf_folder(tmp_path)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(
        w.dense("blk.1.ffn_norm.weight"), sd["model.layers.1.post_attention_layernorm.weight"]
    )
    np.testing.assert_array_equal(w.dense("output.weight"), sd["lm_head.weight"])
    c = w.config
    assert c.rope_scaling.kind == "llama3" and c.rope_scaling.original_max_position == 64
    assert c.rope_theta == 500000.0 and not c.tie_word_embeddings


@pytest.mark.slow
def test_bf16_and_sharded_checkpoints(tmp_path):
    model = _saved("qwen3", tmp_path, dtype=torch.bfloat16, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    w = load_hf_folder(tmp_path)
    q = w.tensors["blk.0.attn_q.weight"]
    assert isinstance(q, GGMLTensor) and q.ggml_type == "BF16" and q.shape == (64, 64)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(q.dequantize(), sd["model.layers.0.self_attn.q_proj.weight"])
    # .to(bf16) also rounded transformers' rotary inv_freq buffer: hence the looser tolerance
    ref = _logits(model.float(), TOKS)
    np.testing.assert_allclose(forward(w, TOKS), ref, atol=1e-3)


def test_multimodal_prefixes_map_to_text_names():
    assert (
        hf_to_canonical("language_model.model.layers.3.mlp.up_proj.weight", "gemma3") == "blk.3.ffn_up.weight"
    )
    assert hf_to_canonical("model.language_model.embed_tokens.weight", "gemma3") == "token_embd.weight"
    assert hf_to_canonical("model.language_model.norm.weight", "gemma3") == "output_norm.weight"
    assert (
        hf_to_canonical("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "gemma3") is None
    )
    assert hf_to_canonical("multi_modal_projector.mm_input_projection_weight", "gemma3") is None
    assert (
        hf_to_canonical("model.layers.0.post_attention_layernorm.weight", "gemma3")
        == "blk.0.post_attention_norm.weight"
    )
    assert (
        hf_to_canonical("model.layers.0.post_attention_layernorm.weight", "qwen2") == "blk.0.ffn_norm.weight"
    )
    assert hf_to_canonical("model.layers.0.self_attn.rotary_emb.inv_freq", "llama") is None


def test_gemma3_multimodal_config_uses_text_config():
    cfg = config_from_hf(
        {
            "model_type": "gemma3",
            "eos_token_id": [1, 106],
            "text_config": {
                "model_type": "gemma3_text",
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 12,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "vocab_size": 300,
                "intermediate_size": 128,
                "sliding_window_pattern": 6,
                "sliding_window": 1024,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                "query_pre_attn_scalar": 16,
            },
            "vision_config": {},
        }
    )
    assert cfg.architecture == "gemma3" and cfg.eos_token_ids == (1, 106)
    assert [i for i, s in enumerate(cfg.layer_is_sliding) if not s] == [5, 11]
    assert cfg.rope_local_theta == 10_000.0 and cfg.rope_scaling.factor == 8.0


def test_eos_from_generation_config_and_lists():
    base = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 300,
        "intermediate_size": 128,
        "eos_token_id": 128001,
    }
    assert config_from_hf(base, {"eos_token_id": [128001, 128008, 128009]}).eos_token_ids == (
        128001,
        128008,
        128009,
    )
    assert config_from_hf({**base, "eos_token_id": [5, 6]}).eos_token_ids == (5, 6)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_weights(str(tmp_path))
    assert "'gpt2' is not supported" in e.value.reason and str(tmp_path) in str(e.value)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_weights(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_weights(str(tmp_path))


@pytest.mark.slow
def test_missing_tensor_and_truncated_shard(tmp_path):
    from safetensors.numpy import load_file, save_file

    _saved("qwen3", tmp_path)
    st = tmp_path / "model.safetensors"
    tensors = load_file(st)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, st)
    with pytest.raises(MissingTensorError, match="blk.1.ffn_up.weight"):
        load_hf_folder(tmp_path)
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated") as e:
        read_safetensors(st)
    assert str(st) in str(e.value)
