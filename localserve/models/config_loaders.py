"""ModelConfig from GGUF metadata or a Hugging Face config.json.

Both paths land on the same facts; where a format is silent the default follows what the
reference implementation does (llama.cpp for GGUF, transformers for HF).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from localserve.errors import ModelLoadError, UnsupportedArchitectureError
from localserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling

# gemma3: every 6th layer is global, the rest slide (both formats default to this)
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_ROPE_LOCAL_THETA = 10_000.0
# chat-turn terminators that llama-family GGUFs often leave out of eos_token_id
_LLAMA_FAMILY_EOT = ("<|eot_id|>", "<|im_end|>")

_HF_MODEL_TYPES = {
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


def unsupported(path: str, arch: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        path, f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    )


def gemma3_sliding_layers(num_layers: int, pattern: int = GEMMA3_SLIDING_PATTERN) -> tuple[bool, ...]:
    return tuple((i + 1) % pattern != 0 for i in range(num_layers))


# -- GGUF ---------------------------------------------------------------------------------


def config_from_gguf(
    metadata: Mapping[str, Any],
    tensor_shapes: Mapping[str, tuple[int, ...]] | None = None,
    path: str = "<gguf>",
) -> ModelConfig:
    """`tensor_shapes` (name -> numpy shape) refines what metadata leaves open: qkv bias,
    tied embeddings, vocabulary size."""
    arch = str(metadata.get("general.architecture", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise unsupported(path, arch or "<missing general.architecture>")
    shapes = dict(tensor_shapes or {})

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(path, f"missing metadata key {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    num_layers = int(key("block_count"))
    num_heads = int(key("attention.head_count"))
    num_kv_heads = int(key("attention.head_count_kv", num_heads))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    intermediate = key("feed_forward_length")
    if isinstance(intermediate, list):  # per-layer list in some files: ours are uniform
        if len(set(intermediate)) != 1:
            raise ModelLoadError(path, "per-layer feed_forward_length is not supported")
        intermediate = intermediate[0]
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    vocab = metadata.get(f"{arch}.vocab_size")
    if vocab is None and "token_embd.weight" in shapes:
        vocab = shapes["token_embd.weight"][0]
    vocab = int(vocab if vocab is not None else len(tokens))
    if vocab <= 0:
        raise ModelLoadError(path, "cannot tell the vocabulary size")

    common: dict[str, Any] = dict(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_context=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6 if arch == "gemma3" else 1e-5)),
        rope_theta=float(key("rope.freq_base", 10_000.0)),
        rope_scaling=_gguf_rope_scaling(metadata, arch, path),
        bos_token_id=_opt_int(metadata.get("tokenizer.ggml.bos_token_id")),
        pad_token_id=_opt_int(metadata.get("tokenizer.ggml.padding_token_id")),
        eos_token_ids=_gguf_eos(metadata, tokens, arch),
        tie_word_embeddings="output.weight" not in shapes if shapes else arch in ("gemma3",),
        name=str(metadata.get("general.name", "")),
    )
    if arch == "gemma3":
        return ModelConfig(**common, **_gguf_gemma3(metadata, num_layers, hidden, num_heads, head_dim))
    sliding = metadata.get(f"{arch}.attention.sliding_window")
    return ModelConfig(
        **common,
        qkv_bias="blk.0.attn_q.bias" in shapes if shapes else arch == "qwen2",
        qk_norm=arch == "qwen3",
        sliding_window=int(sliding) if sliding else None,
        layer_is_sliding=(True,) * num_layers if sliding else (),
    )


def _gguf_gemma3(md: Mapping[str, Any], num_layers: int, hidden: int, num_heads: int, head_dim: int) -> dict:
    pattern = md.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer files: one bool per layer
        layer_is_sliding = tuple(bool(p) for p in pattern)
    else:
        layer_is_sliding = gemma3_sliding_layers(num_layers, int(pattern or GEMMA3_SLIDING_PATTERN))
    # llama.cpp scales by head_dim, except Gemma 3 27B (62 layers) whose query_pre_attn_scalar
    # is hidden / heads
    scalar = hidden / num_heads if num_layers == 62 else head_dim
    softcap = md.get("gemma3.final_logit_softcapping")
    return dict(
        rope_local_theta=float(md.get("gemma3.rope.freq_base_swa", GEMMA3_ROPE_LOCAL_THETA)),
        sliding_window=int(md.get("gemma3.attention.sliding_window", 512)),
        layer_is_sliding=layer_is_sliding,
        qk_norm=True,
        hidden_act="gelu_tanh",
        embedding_scale=math.sqrt(hidden),
        attn_scale=scalar**-0.5,
        post_norms=True,
        final_logit_softcapping=float(softcap) if softcap else None,
    )


def _gguf_rope_scaling(md: Mapping[str, Any], arch: str, path: str) -> RopeScaling | None:
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return RopeScaling("linear", float(factor))
    raise ModelLoadError(path, f"rope scaling {kind!r} is not supported")


def _gguf_eos(md: Mapping[str, Any], tokens: list[str], arch: str) -> tuple[int, ...]:
    ids = [md.get("tokenizer.ggml.eos_token_id"), md.get("tokenizer.ggml.eot_token_id")]
    extra = ("<end_of_turn>",) if arch == "gemma3" else _LLAMA_FAMILY_EOT
    if tokens:
        lookup = {t: i for i, t in enumerate(tokens) if t in extra}
        ids += [lookup.get(t) for t in extra]
    return _unique_ints(ids)


# -- Hugging Face -------------------------------------------------------------------------


def config_from_hf(
    config_json: Mapping[str, Any],
    generation_config: Mapping[str, Any] | None = None,
    path: str = "<config.json>",
) -> ModelConfig:
    cfg = dict(config_json)
    if "text_config" in cfg and cfg.get("model_type") == "gemma3":  # Gemma3ForConditionalGeneration
        text = dict(cfg["text_config"])
        for k in ("eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings"):
            text.setdefault(k, cfg.get(k))
        cfg = text
    model_type = str(cfg.get("model_type", ""))
    arch = _HF_MODEL_TYPES.get(model_type)
    if arch is None:
        raise unsupported(path, model_type or "<missing model_type>")

    hidden = int(cfg["hidden_size"])
    num_heads = int(cfg["num_attention_heads"])
    num_layers = int(cfg["num_hidden_layers"])
    head_dim = cfg.get("head_dim") or hidden // num_heads
    global_rope, local_rope = _hf_rope_parameters(cfg)
    eos = cfg.get("eos_token_id")
    if generation_config:
        eos = [eos, generation_config.get("eos_token_id")]
    common: dict[str, Any] = dict(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_context=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(global_rope.get("rope_theta", 10_000.0)),
        rope_scaling=_hf_rope_scaling(global_rope, path),
        bos_token_id=_opt_int(cfg.get("bos_token_id")),
        pad_token_id=_opt_int(cfg.get("pad_token_id")),
        eos_token_ids=_unique_ints(_flatten(eos)),
        name=str(cfg.get("_name_or_path", "")),
    )
    if arch == "gemma3":
        gemma = _hf_gemma3(cfg, num_layers, hidden, int(head_dim))
        return ModelConfig(
            **common, **gemma, rope_local_theta=float(local_rope.get("rope_theta", GEMMA3_ROPE_LOCAL_THETA))
        )
    sliding = cfg.get("sliding_window")
    # qwen2 configs carry a sliding_window that is off unless use_sliding_window
    if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        sliding = None
    return ModelConfig(
        **common,
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=int(sliding) if sliding else None,
        layer_is_sliding=(True,) * num_layers if sliding else (),
    )


def _hf_gemma3(cfg: Mapping[str, Any], num_layers: int, hidden: int, head_dim: int) -> dict:
    if cfg.get("layer_types"):
        layer_is_sliding = tuple(t == "sliding_attention" for t in cfg["layer_types"])
    else:
        layer_is_sliding = gemma3_sliding_layers(
            num_layers, int(cfg.get("sliding_window_pattern") or GEMMA3_SLIDING_PATTERN)
        )
    softcap = cfg.get("final_logit_softcapping")
    return dict(
        sliding_window=int(cfg.get("sliding_window") or 4096),
        layer_is_sliding=layer_is_sliding,
        qk_norm=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        hidden_act="gelu_tanh",
        embedding_scale=math.sqrt(hidden),
        attn_scale=float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        post_norms=True,
        final_logit_softcapping=float(softcap) if softcap else None,
    )


def _hf_rope_parameters(cfg: Mapping[str, Any]) -> tuple[dict, dict]:
    """(global, sliding-layer) rope parameters: {"rope_theta", "rope_type", "factor", ...}.

    transformers >= 5 writes `rope_parameters` (per layer type for gemma3); older configs
    have rope_theta + rope_scaling (+ gemma3's rope_local_base_freq)."""
    params = cfg.get("rope_parameters")
    if params:
        if "full_attention" in params:
            return dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
        return dict(params), {}
    glob = dict(cfg.get("rope_scaling") or {})
    if "rope_theta" in cfg:
        glob["rope_theta"] = cfg["rope_theta"]
    local = {"rope_theta": cfg["rope_local_base_freq"]} if "rope_local_base_freq" in cfg else {}
    return glob, local


def _hf_rope_scaling(rs: Mapping[str, Any], path: str) -> RopeScaling | None:
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    factor = float(rs.get("factor", 1.0))
    if kind == "linear":
        return RopeScaling("linear", factor) if factor != 1.0 else None
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor,
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
        )
    raise ModelLoadError(path, f"rope scaling {kind!r} is not supported")


# -- helpers ------------------------------------------------------------------------------


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _flatten(v: Any) -> list:
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _flatten(item)]
    return [v]


def _unique_ints(values: Iterable[Any]) -> tuple[int, ...]:
    out: list[int] = []
    for v in _flatten(list(values)):
        if v is not None and int(v) not in out:
            out.append(int(v))
    return tuple(out)


# names the ModelConfig docstring refers to
from_gguf_metadata = config_from_gguf
from_hf_config = config_from_hf
