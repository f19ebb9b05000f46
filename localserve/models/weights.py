"""Host-side weights: what a model loader hands to a backend.

Canonical tensor names (GGUF style, arch-independent); shapes are numpy row-major in the
Hugging Face orientation ([out_features, in_features] for linear layers):

    token_embd.weight            [vocab, hidden]
    output.weight                [vocab, hidden]   (absent when tie_word_embeddings)
    output_norm.weight           [hidden]
    blk.{i}.attn_norm.weight     [hidden]
    blk.{i}.attn_q.weight        [num_heads*head_dim, hidden]     (+ .bias when qkv_bias)
    blk.{i}.attn_k.weight        [num_kv_heads*head_dim, hidden]  (+ .bias)
    blk.{i}.attn_v.weight        [num_kv_heads*head_dim, hidden]  (+ .bias)
    blk.{i}.attn_q_norm.weight   [head_dim]   (qk_norm)
    blk.{i}.attn_k_norm.weight   [head_dim]   (qk_norm)
    blk.{i}.attn_output.weight   [hidden, num_heads*head_dim]
    blk.{i}.post_attention_norm.weight  [hidden]   (post_norms)
    blk.{i}.ffn_norm.weight      [hidden]          (pre-FFN norm)
    blk.{i}.ffn_gate.weight      [intermediate, hidden]
    blk.{i}.ffn_up.weight        [intermediate, hidden]
    blk.{i}.ffn_down.weight      [hidden, intermediate]
    blk.{i}.post_ffw_norm.weight [hidden]          (post_norms)

Conventions every loader guarantees, so model code needs no per-format branches:
* RMSNorm weights are the effective multiplier: y = x / rms(x) * w. (Gemma checkpoints in
  HF format store w - 1; the HF loader adds 1. GGUF files already store 1 + w.)
* Q/K rows are in the HF "rotate_half" (NeoX) rotary layout; the GGUF loader undoes the
  interleaving permutation llama.cpp applies to llama/mistral q/k weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Union

import numpy as np

from localserve.models.config import ModelConfig


@dataclass(slots=True)
class GGMLTensor:
    """A tensor still in its GGML block encoding (Q8_0, Q4_K, BF16, ...).

    `raw` holds the bytes exactly as in the file ([rows, bytes_per_row] uint8);
    `shape` is the logical numpy shape ([out, in] for linear weights).
    """

    ggml_type: str
    raw: np.ndarray
    shape: tuple[int, ...]

    def dequantize(self) -> np.ndarray:
        from localserve.models.ggml_quants import dequantize

        return dequantize(self.raw, self.ggml_type, self.shape)


@dataclass(slots=True)
class RandomTensor:
    """A tensor to be filled with seeded random values where it will live.

    `random:<preset>` models use these so an 8B shape never materializes on the host:
    a GPU backend draws it on the device; `materialize()` draws it on the host (small models,
    tests). Values: normal(0, std), or all `fill` when fill is not None (norm weights).
    """

    shape: tuple[int, ...]
    seed: int
    std: float = 0.02
    fill: float | None = None

    def materialize(self) -> np.ndarray:
        if self.fill is not None:
            return np.full(self.shape, self.fill, dtype=np.float32)
        rng = np.random.default_rng(self.seed)
        return (rng.standard_normal(self.shape, dtype=np.float32) * self.std).astype(np.float32)


HostTensor = Union[np.ndarray, GGMLTensor, RandomTensor]


@dataclass(slots=True)
class LoadedWeights:
    config: ModelConfig
    tensors: Mapping[str, HostTensor]
    source: str  # file path, folder or "random:<preset>"
    meta: dict = field(default_factory=dict)

    def dense(self, name: str) -> np.ndarray:
        """The named tensor as float32 (dequantized when needed)."""
        t = self.tensors[name]
        if isinstance(t, GGMLTensor):
            return t.dequantize()
        if isinstance(t, RandomTensor):
            return t.materialize()
        return np.asarray(t, dtype=np.float32)
