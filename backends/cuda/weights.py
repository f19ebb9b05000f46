"""LoadedWeights → torch_common's TorchWeights on a GPU, dense in the compute dtype.

Host tensors (numpy, GGML blocks) are dequantized on the host and copied over one tensor at a
time. Large `random:` tensors are drawn on the device from their seed, so an 8B shape never
materialises on the host (their values then differ from the host draw; small ones, like every
tensor of the tiny test presets, are drawn on the host so they equal the CPU reference's).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from localserve.backends.torch_common.layers import DenseLinear
from localserve.backends.torch_common.weights import Embedding, LayerWeights, TorchWeights
from localserve.errors import ModelLoadError
from localserve.models.weights import LoadedWeights, RandomTensor

from .device import memory_report, out_of_memory_message

# RandomTensors of at least this many elements are drawn on the device
DEVICE_DRAW_MIN = 1 << 22


def weight_bytes(weights: LoadedWeights, dtype: torch.dtype) -> int:
    """Device bytes the dense weights take (a tied output layer shares the embedding)."""
    el = torch.empty(0, dtype=dtype).element_size()
    return sum(math.prod(t.shape) for t in weights.tensors.values()) * el


def build_device_weights(weights: LoadedWeights, dtype: torch.dtype,
                         device: torch.device) -> TorchWeights:
    """Dense TorchWeights on `device`; a clear ModelLoadError when they cannot fit."""
    need = weight_bytes(weights, dtype)
    free, total = memory_report(device)
    hint = ("use a smaller model or a lower-precision dtype (bfloat16), or free the GPU "
            "(other processes hold memory)")
    if device.type != "cpu" and need > free:
        raise ModelLoadError(weights.source, out_of_memory_message(
            "loading the weights", need, free, total, hint))
    try:
        return _build(weights, dtype, device)
    except torch.cuda.OutOfMemoryError as exc:
        free, total = memory_report(device)
        raise ModelLoadError(weights.source, out_of_memory_message(
            "loading the weights", need, free + _allocated(device), total, hint)) from exc


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _build(weights: LoadedWeights, dtype: torch.dtype, device: torch.device) -> TorchWeights:
    cfg = weights.config

    def load(name: str) -> torch.Tensor:
        """The tensor on the device in `dtype` (float32 intermediates stay one tensor big)."""
        t = weights.tensors[name]
        if isinstance(t, RandomTensor) and math.prod(t.shape) >= DEVICE_DRAW_MIN:
            if t.fill is not None:
                return torch.full(t.shape, t.fill, dtype=dtype, device=device)
            gen = torch.Generator(device=device)
            gen.manual_seed(t.seed)
            out = torch.empty(t.shape, dtype=dtype, device=device)
            rows = max(1, (1 << 26) // max(1, math.prod(t.shape[1:])))  # bound the fp32 scratch
            for i in range(0, t.shape[0], rows):
                part = out[i:i + rows]
                part.copy_(torch.randn(part.shape, generator=gen, device=device).mul_(t.std))
            return out
        a = np.asarray(weights.dense(name), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    def opt(name: str) -> torch.Tensor | None:
        return load(name) if name in weights.tensors else None

    def fused(names: list[str], with_bias: bool) -> DenseLinear:
        ws = [load(n + ".weight") for n in names]
        bias = None
        if with_bias:
            parts = [opt(n + ".bias") for n in names]
            bias = torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=dtype,
                                                                  device=device)
                              for b, w in zip(parts, ws)])
        w = torch.cat(ws, dim=0)
        del ws
        return DenseLinear(w, bias)

    layers = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=load(p + "attn_norm.weight"),
            qkv=fused([p + "attn_q", p + "attn_k", p + "attn_v"], cfg.qkv_bias),
            q_norm=load(p + "attn_q_norm.weight") if cfg.qk_norm else None,
            k_norm=load(p + "attn_k_norm.weight") if cfg.qk_norm else None,
            o_proj=DenseLinear(load(p + "attn_output.weight")),
            post_attn_norm=load(p + "post_attention_norm.weight") if cfg.post_norms else None,
            ffn_norm=load(p + "ffn_norm.weight"),
            gate_up=fused([p + "ffn_gate", p + "ffn_up"], False),
            down=DenseLinear(load(p + "ffn_down.weight")),
            post_ffw_norm=load(p + "post_ffw_norm.weight") if cfg.post_norms else None,
        ))
    tied = cfg.tie_word_embeddings or "output.weight" not in weights.tensors
    embed = DenseLinear(load("token_embd.weight"))
    head = embed if tied else DenseLinear(load("output.weight"))
    emb = Embedding(embed, dtype, cfg.embedding_scale)
    if emb.scale is not None:
        emb.scale = emb.scale.to(device)
    return TorchWeights(embed=emb, layers=layers, final_norm=load("output_norm.weight"),
                        lm_head=head)
