"""`random:NAME` models: real architecture shapes filled with seeded random weights.

The large presets copy the published Hugging Face configs so benchmarks see true shapes;
the tiny ones exist for tests. Every tensor is a RandomTensor whose seed is derived from
the preset and tensor name, so a preset always yields the same weights on every backend.
"""

from __future__ import annotations

import math
import zlib

from localserve.errors import ModelLoadError
from localserve.models.config import ModelConfig, RopeScaling
from localserve.models.config_loaders import gemma3_sliding_layers
from localserve.models.gguf_loader import expected_tensor_names
from localserve.models.weights import LoadedWeights, RandomTensor

# Initializer std of the real checkpoints' configs (initializer_range).
LARGE_STD = 0.02


def _llama_3_1_8b() -> ModelConfig:
    return ModelConfig(
        architecture="llama", name="llama-3.1-8b", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        max_context=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    )


def _qwen3_0_6b() -> ModelConfig:
    return ModelConfig(
        architecture="qwen3", name="qwen3-0.6b", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        max_context=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0, qk_norm=True,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_ids=(151645, 151643),
    )


def _gemma_3_270m() -> ModelConfig:
    return ModelConfig(
        architecture="gemma3", name="gemma-3-270m", vocab_size=262144, hidden_size=640,
        intermediate_size=2048, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
        max_context=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        sliding_window=512, layer_is_sliding=gemma3_sliding_layers(18), qk_norm=True,
        tie_word_embeddings=True, hidden_act="gelu_tanh", embedding_scale=math.sqrt(640),
        attn_scale=256**-0.5, post_norms=True, bos_token_id=2, eos_token_ids=(1, 106), pad_token_id=0,
    )


_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
    head_dim=16, max_context=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
)


def _tiny_llama() -> ModelConfig:
    # llama3 rope scaling with a small original context so the scaled band is exercised
    return ModelConfig(
        architecture="llama", name="tiny-llama", num_layers=2, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 256), **_TINY,
    )


def _tiny_mistral() -> ModelConfig:
    return ModelConfig(architecture="mistral", name="tiny-mistral", num_layers=2, rope_theta=1_000_000.0, **_TINY)


def _tiny_qwen2() -> ModelConfig:
    return ModelConfig(
        architecture="qwen2", name="tiny-qwen2", num_layers=2, rope_theta=1_000_000.0, qkv_bias=True,
        tie_word_embeddings=True, **_TINY,
    )


def _tiny_qwen3() -> ModelConfig:
    return ModelConfig(
        architecture="qwen3", name="tiny-qwen3", num_layers=3, rope_theta=1_000_000.0, qk_norm=True,
        tie_word_embeddings=True, **_TINY,
    )


def _tiny_gemma3() -> ModelConfig:
    return ModelConfig(
        architecture="gemma3", name="tiny-gemma3", num_layers=6, rope_theta=1_000_000.0,
        rope_local_theta=10_000.0, sliding_window=16, layer_is_sliding=gemma3_sliding_layers(6),
        qk_norm=True, tie_word_embeddings=True, hidden_act="gelu_tanh", embedding_scale=8.0,
        attn_scale=16**-0.5, post_norms=True, **_TINY,
    )


PRESETS = {
    "llama-3.1-8b": _llama_3_1_8b,
    "qwen3-0.6b": _qwen3_0_6b,
    "gemma-3-270m": _gemma_3_270m,
    "tiny-llama": _tiny_llama,
    "tiny-mistral": _tiny_mistral,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-qwen3": _tiny_qwen3,
    "tiny-gemma3": _tiny_gemma3,
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ModelLoadError(f"random:{name}", f"unknown preset (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def load_preset(name: str) -> LoadedWeights:
    cfg = preset_config(name)
    tensors = {t: _random_tensor(cfg, name, t) for t in expected_tensor_names(cfg)}
    return LoadedWeights(config=cfg, tensors=tensors, source=f"random:{name}", meta={"format": "random"})


def _random_tensor(cfg: ModelConfig, preset: str, tensor: str) -> RandomTensor:
    shape = _shape(cfg, tensor)
    seed = zlib.crc32(f"{preset}/{tensor}".encode())
    if tensor.endswith("norm.weight"):
        return RandomTensor(shape, seed, fill=1.0)
    return RandomTensor(shape, seed, std=_std(cfg, tensor, shape))


def _std(cfg: ModelConfig, tensor: str, shape: tuple[int, ...]) -> float:
    if cfg.hidden_size >= 512 or tensor == "token_embd.weight" or tensor == "output.weight":
        return LARGE_STD
    # Tiny models: with std 0.02 everywhere every block is a near-no-op on the residual
    # stream, and with tied embeddings the greedy next token is then the current one forever.
    # Projections with gain 3 (std 3/sqrt(fan_in)) let attention and MLP dominate the small
    # embeddings, so greedy continuations vary (checked in tests/models/test_presets.py).
    if tensor.endswith(".bias"):
        return 0.1
    return 3.0 / math.sqrt(shape[-1])


def _shape(cfg: ModelConfig, tensor: str) -> tuple[int, ...]:
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    if tensor in ("token_embd.weight", "output.weight"):
        return (cfg.vocab_size, h)
    if tensor == "output_norm.weight":
        return (h,)
    part = tensor.split(".")[2]
    is_bias = tensor.endswith(".bias")
    table = {
        "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
        "ffn_gate": (cfg.intermediate_size, h), "ffn_up": (cfg.intermediate_size, h),
        "ffn_down": (h, cfg.intermediate_size), "attn_q_norm": (cfg.head_dim,),
        "attn_k_norm": (cfg.head_dim,),
    }
    if part not in table:  # the per-layer hidden-sized norms
        return (h,)
    shape = table[part]
    return shape[:1] if is_bias else shape
