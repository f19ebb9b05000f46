"""LoadedWeights (host numpy / GGML blocks / random specs) → torch layers in a chosen format.

Projections that read the same input are fused here (q|k|v, gate|up) so a layer runs one
matmul per input instead of three or two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from localserve.models.config import ModelConfig
from localserve.models.weights import LoadedWeights

from .layers import (
    WEIGHT_FORMATS,
    DenseLinear,
    Int8GroupLinear,
    Int8Linear,
    Linear,
    Q8KernelLinear,
    make_linear,
    q8_kernel,
)


@dataclass(slots=True, frozen=True)
class WeightFormat:
    """Format per tensor class: `layers` for every block's linears, `lm_head` for the output."""

    layers: str = "dense"
    lm_head: str = "dense"

    @classmethod
    def parse(cls, name: str) -> "WeightFormat":
        """"dense" | "int8" | "q8" | "q8k" | "q8k8" | "int4", or "<layers>+<lm_head>" (e.g. "q8+int4")."""
        layers, _, head = name.partition("+")
        head = head or layers
        for part in (layers, head):
            if part not in WEIGHT_FORMATS:
                raise ValueError(
                    f"unknown weight format {name!r}: use one of {', '.join(WEIGHT_FORMATS)}"
                    " or <layers>+<output layer>"
                )
        return cls(layers, head)


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: Linear
    post_attn_norm: torch.Tensor | None
    ffn_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    post_ffw_norm: torch.Tensor | None


class Embedding:
    """Token embedding rows in the compute dtype, from a dense, per-row int8 or q8 table."""

    Table = DenseLinear | Int8Linear | Int8GroupLinear | Q8KernelLinear

    def __init__(self, table: Table, dtype: torch.dtype,
                 scale: float | None) -> None:
        self.table = table
        self.dtype = dtype
        # HF multiplies by the scale cast to the compute dtype (gemma: sqrt(hidden))
        self.scale = None if scale is None else torch.tensor(scale, dtype=dtype)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        if isinstance(t, DenseLinear):
            x = t.weight[ids].to(self.dtype)
        elif isinstance(t, (Int8GroupLinear, Q8KernelLinear)):
            x = t.rows(ids, self.dtype)
        else:
            x = t.qweight[ids].to(self.dtype) * t.scales[ids].to(self.dtype)[:, None]
        return x if self.scale is None else x * self.scale


@dataclass(slots=True)
class TorchWeights:
    embed: Embedding
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: Linear

    def nbytes(self) -> int:
        total = self.lm_head.nbytes()
        for lw in self.layers:
            total += sum(x.nbytes() for x in (lw.qkv, lw.o_proj, lw.gate_up, lw.down))
        return total


def build_torch_weights(weights: LoadedWeights, fmt: WeightFormat,
                        dtype: torch.dtype, prepared=None) -> TorchWeights:
    """`prepared`: a store of Q8 codes by layer (backends/cpu/prepared.py): a layer found there is
    built from its codes without dequantizing the file's tensor; one that is not is put there."""
    cfg = weights.config

    def dense(name: str) -> torch.Tensor:
        a = np.asarray(weights.dense(name), dtype=np.float32)
        if not (a.flags.writeable and a.flags.c_contiguous):  # e.g. a read-only mmap view
            a = np.array(a, dtype=np.float32, order="C")
        return torch.from_numpy(a)

    def opt(name: str) -> torch.Tensor | None:
        return dense(name) if name in weights.tensors else None

    def norm(name: str) -> torch.Tensor:
        return dense(name).to(dtype)

    def linear(names: list[str], with_bias: bool, layer_fmt: str, row_lookup: bool = False) -> Linear:
        bias = None
        if with_bias:  # qwen2 has q/k/v biases; a missing one is zeros
            parts = [opt(n + ".bias") for n in names]
            bias = torch.cat([b if b is not None else torch.zeros(dense(n + ".weight").shape[0])
                              for b, n in zip(parts, names)]).to(dtype)
        shapes = [weights.tensors[n + ".weight"].shape for n in names]
        return _linear_from(prepared, "+".join(names), lambda: torch.cat([dense(n + ".weight") for n in names]),
                            (sum(s[0] for s in shapes), shapes[0][1]), bias, layer_fmt, dtype, row_lookup)

    layers = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=norm(p + "attn_norm.weight"),
            qkv=linear([p + "attn_q", p + "attn_k", p + "attn_v"], cfg.qkv_bias, fmt.layers),
            q_norm=norm(p + "attn_q_norm.weight") if cfg.qk_norm else None,
            k_norm=norm(p + "attn_k_norm.weight") if cfg.qk_norm else None,
            o_proj=linear([p + "attn_output"], False, fmt.layers),
            post_attn_norm=norm(p + "post_attention_norm.weight") if cfg.post_norms else None,
            ffn_norm=norm(p + "ffn_norm.weight"),
            gate_up=linear([p + "ffn_gate", p + "ffn_up"], False, fmt.layers),
            down=linear([p + "ffn_down"], False, fmt.layers),
            post_ffw_norm=norm(p + "post_ffw_norm.weight") if cfg.post_norms else None,
        ))
    lm_head, embed_table = _head_and_table(cfg, weights, fmt.lm_head, dtype, dense, prepared)
    return TorchWeights(
        embed=Embedding(embed_table, dtype, cfg.embedding_scale),
        layers=layers,
        final_norm=norm("output_norm.weight"),
        lm_head=lm_head,
    )


def _linear_from(prepared, key: str, weight, shape: tuple[int, int], bias: torch.Tensor | None, layer_fmt: str,
                 dtype: torch.dtype, row_lookup: bool = False) -> Linear:
    """make_linear(weight(), ...), through `prepared` for the compiled Q8 kernel's formats:
    weight() (the file's tensor, dequantized) is only read when its codes are not there."""
    kernel = q8_kernel() if prepared is not None and layer_fmt in ("q8k", "q8k8") else None
    if kernel is None:
        return make_linear(weight(), bias, layer_fmt, dtype, row_lookup=row_lookup)
    codes = prepared.get(key, shape)
    if codes is None:
        w = weight()
        if w.shape[1] % 32:
            return make_linear(w, bias, layer_fmt, dtype, row_lookup=row_lookup)
        codes = Q8KernelLinear.quantize(w)
        prepared.put(key, *codes)
    return Q8KernelLinear.from_codes(*codes, bias, kernel, act_bits=8 if layer_fmt == "q8k8" else 16)


def _head_and_table(cfg: ModelConfig, weights: LoadedWeights, head_fmt: str, dtype: torch.dtype, dense,
                    prepared=None) -> tuple[Linear, Embedding.Table]:
    """The output layer and the table embeddings are looked up from, sharing memory when tied."""
    tied = cfg.tie_word_embeddings or "output.weight" not in weights.tensors
    head_name = "token_embd.weight" if tied else "output.weight"
    head = _linear_from(prepared, head_name, lambda: dense(head_name), tuple(weights.tensors[head_name].shape), None,
                        head_fmt, dtype, row_lookup=tied)
    if tied and isinstance(head, (DenseLinear, Int8Linear, Int8GroupLinear, Q8KernelLinear)):
        return head, head
    # untied, or an int4 output layer (its packing cannot be row-indexed): a separate table,
    # bf16 when the output layer is quantized (only T rows per step are read from it)
    embed_w = dense("token_embd.weight")
    table = DenseLinear(embed_w.to(dtype if head_fmt == "dense" else torch.bfloat16))
    return head, table
