"""HF transformers models built from our LoadedWeights, and a plain greedy loop over them.

The HF model is the independent reference: its own config class, modules, rotary, masks
and KV cache. Only the weights are shared (canonical GGUF-style names → HF names).
"""

from __future__ import annotations

import numpy as np
import torch

from localserve.models.config import ModelConfig
from localserve.models.weights import LoadedWeights

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_config(cfg: ModelConfig):
    import transformers as tf

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_context,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": rs.kind, "rope_theta": cfg.rope_theta, "factor": rs.factor}
        if rs.kind == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position)
    arch = cfg.architecture
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **common,
            rope_parameters={
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
            },
            sliding_window=cfg.sliding_window,
            layer_types=["sliding_attention" if s else "full_attention" for s in cfg.layer_is_sliding],
            query_pre_attn_scalar=int(round(cfg.scale**-2)),
            hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=cfg.final_logit_softcapping,
            attn_logit_softcapping=None,
        )
    if arch in ("llama", "mistral"):
        extra = {"sliding_window": None} if arch == "mistral" else {}
        cls = tf.LlamaConfig if arch == "llama" else tf.MistralConfig
        return cls(**common, rope_parameters=rope, **extra)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, rope_parameters=rope, use_sliding_window=False)
    raise AssertionError(arch)


def hf_state_dict(weights: LoadedWeights) -> dict[str, torch.Tensor]:
    cfg = weights.config
    gemma = cfg.architecture == "gemma3"
    names = dict(_LAYER_NAMES)
    if gemma:
        names.update(ffn_norm="pre_feedforward_layernorm",
                     post_attention_norm="post_attention_layernorm",
                     post_ffw_norm="post_feedforward_layernorm")
    else:
        names["ffn_norm"] = "post_attention_layernorm"
    sd = {}
    for name in weights.tensors:
        arr = torch.from_numpy(np.array(weights.dense(name), dtype=np.float32))
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        else:
            _, i, base, kind = name.split(".")
            hf = f"model.layers.{i}.{names[base]}.{kind}"
        if gemma and name.endswith("norm.weight"):
            arr = arr - 1.0  # HF gemma norms compute x * (1 + w)
        sd[hf] = arr
    if cfg.tie_word_embeddings or "output.weight" not in weights.tensors:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def hf_model(weights: LoadedWeights, attn_implementation: str = "eager"):
    import transformers as tf

    cfg = hf_config(weights.config)
    cfg._attn_implementation = attn_implementation
    cls = tf.Gemma3ForCausalLM if weights.config.architecture == "gemma3" else tf.AutoModelForCausalLM
    model = cls.from_config(cfg, dtype=torch.float32) if cls is tf.AutoModelForCausalLM else cls(cfg)
    sd = hf_state_dict(weights)
    if not weights.config.qkv_bias and weights.config.architecture == "qwen2":
        raise AssertionError("HF qwen2 always has qkv biases")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" for m in missing), missing
    return model.float().eval()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    out = model(torch.tensor([prompt]), use_cache=True)
    past = out.past_key_values
    tokens = []
    for _ in range(max_new):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


@torch.inference_mode()
def hf_greedy_batch(model, prompts: list[list[int]], max_new: int, pad_id: int = 0) -> list[list[int]]:
    """hf_greedy for several prompts in one left-padded batch (one forward per new token).

    Only for prompts shorter than any sliding window: HF's window counts cache slots,
    padding included.
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    tokens = []
    for _ in range(max_new):
        tok = out.logits[:, -1].argmax(-1)
        tokens.append(tok)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(tokens, dim=1).tolist()
