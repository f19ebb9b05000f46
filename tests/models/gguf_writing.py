"""Write small GGUF files the way llama.cpp's converter does (test helper)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from localserve.models.config import ModelConfig
from localserve.models.weights import LoadedWeights


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `permute` (n_head is the KV head count for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path,
    w: LoadedWeights,
    quant: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
    arch: str | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    tokens: list[str] | None = None,
) -> Path:
    """Write `w` as a GGUF file. Linear weights named in `quant` (name -> type among those
    gguf-py can quantize) are quantized; llama/mistral q/k are permuted like llama.cpp does."""
    cfg: ModelConfig = w.config
    arch = arch or cfg.architecture
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(cfg.name or "test")
    writer.add_context_length(cfg.max_context)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens or [f"<t{i}>" for i in range(cfg.vocab_size)])
    if cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_ids:
        writer.add_eos_token_id(cfg.eos_token_ids[0])
    quant = quant or {}
    for name in w.tensors:
        if name in drop:
            continue
        t = w.dense(name).astype(np.float32)
        if arch in ("llama", "mistral") and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
            t = llama_cpp_permute(t, heads)
        kind = quant.get(name)
        if kind is None:
            writer.add_tensor(name, t)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    for name, t in (extra_tensors or {}).items():
        writer.add_tensor(name, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
