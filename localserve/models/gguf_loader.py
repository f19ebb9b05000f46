"""Load a GGUF file into LoadedWeights with canonical tensor names.

GGUF tensor names already are the canonical names. Quantized tensors stay GGMLTensor views
of the memory-mapped file (no decoding at load), except where llama.cpp's q/k rotary
permutation must be undone: that permutes whole rows, and rows are independent runs of
blocks, so it is applied to the raw bytes exactly, whatever the quant type.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from localserve.errors import MissingTensorError, ModelLoadError
from localserve.models.config import ModelConfig, RopeScaling
from localserve.models.config_loaders import config_from_gguf
from localserve.models.gguf_file import GGUFFile
from localserve.models.weights import GGMLTensor, HostTensor, LoadedWeights

# architectures whose q/k rows llama.cpp's converter interleaves (convert_hf_to_gguf `permute`)
PERMUTED_QK_ARCHS = ("llama", "mistral")
ROPE_FREQS = "rope_freqs.weight"


def expected_tensor_names(cfg: ModelConfig) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("output.weight")
    per_layer = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ]
    if cfg.qk_norm:
        per_layer += ["attn_q_norm", "attn_k_norm"]
    if cfg.post_norms:
        per_layer += ["post_attention_norm", "post_ffw_norm"]
    for i in range(cfg.num_layers):
        names += [f"blk.{i}.{p}.weight" for p in per_layer]
        if cfg.qkv_bias:
            names += [f"blk.{i}.attn_{p}.bias" for p in "qkv"]
    return names


def load_gguf(path: str | os.PathLike) -> LoadedWeights:
    path = str(path)
    f = GGUFFile(path)
    shapes = {name: info.shape for name, info in f.tensor_infos.items()}
    cfg = config_from_gguf(f.metadata, shapes, path)
    tensors: dict[str, HostTensor] = {}
    for name in expected_tensor_names(cfg):
        if name not in f.tensor_infos:
            raise MissingTensorError(path, f"missing tensor {name}")
        tensors[name] = f.tensor(name)
    _check_shapes(path, cfg, tensors)
    if ROPE_FREQS in f.tensor_infos:
        cfg = _with_llama3_rope(path, cfg, np.asarray(f.tensor(ROPE_FREQS), dtype=np.float32))
    if cfg.architecture in PERMUTED_QK_ARCHS:
        for i in range(cfg.num_layers):
            for proj, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
                for kind in ("weight", "bias"):
                    name = f"blk.{i}.attn_{proj}.{kind}"
                    if name in tensors:
                        tensors[name] = unpermute_rows(tensors[name], heads)
    return LoadedWeights(
        config=cfg,
        tensors=tensors,
        source=path,
        meta={"format": "gguf", "gguf_metadata": f.metadata, "gguf_version": f.version},
    )


def unpermute_rows(t: HostTensor, n_heads: int) -> HostTensor:
    """Inverse of convert_hf_to_gguf's `permute`: within each head, llama.cpp stores rotary
    pairs interleaved (row 2j, 2j+1 = HF rows j, j + head_dim/2); put them back as halves."""
    n_rows = t.shape[0]
    head_dim = n_rows // n_heads
    # GGUF row (h, j, s) holds HF row (h, s, j) with j < head_dim/2, s in {0, 1}
    order = np.arange(n_rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)
    if isinstance(t, GGMLTensor):
        return GGMLTensor(t.ggml_type, np.ascontiguousarray(t.raw[order]), t.shape)
    return np.ascontiguousarray(np.asarray(t)[order])


def _check_shapes(path: str, cfg: ModelConfig, tensors: dict[str, HostTensor]) -> None:
    want = {
        "token_embd.weight": (cfg.vocab_size, cfg.hidden_size),
        "blk.0.attn_q.weight": (cfg.q_size, cfg.hidden_size),
        "blk.0.attn_k.weight": (cfg.kv_size, cfg.hidden_size),
        "blk.0.ffn_up.weight": (cfg.intermediate_size, cfg.hidden_size),
    }
    for name, shape in want.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ModelLoadError(path, f"tensor {name} has shape {got}, metadata says {shape}")


def _with_llama3_rope(path: str, cfg: ModelConfig, divisors: np.ndarray) -> ModelConfig:
    """Llama 3.x GGUFs store the "llama3" rope scaling as a per-frequency divisor table
    (rope_freqs.weight) instead of metadata: recover parameters that reproduce the table."""
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0):
        return cfg
    for scaling in _llama3_candidates(cfg, divisors, factor):
        if np.allclose(llama3_freq_divisors(cfg.head_dim, cfg.rope_theta, scaling), divisors, rtol=1e-4):
            return dataclasses.replace(cfg, rope_scaling=scaling)
    raise ModelLoadError(path, "rope_freqs.weight does not match any llama3 rope scaling")


def _llama3_candidates(cfg: ModelConfig, divisors: np.ndarray, factor: float) -> list[RopeScaling]:
    """Parameter sets that may reproduce `divisors`, most conventional first.

    In the smooth band 1/divisor = (1 - s)/factor + s with s = orig/(high-low)/wavelen -
    low/(high-low): only those two ratios matter, so low = 1 loses nothing."""
    out = [RopeScaling("llama3", factor, 1.0, 4.0, 8192)]
    if factor <= 1.0:
        return out
    wavelen = 2 * np.pi * cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    band = (divisors > 1.0 + 1e-4) & (divisors < factor * (1 - 1e-4))
    s = (1.0 / divisors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
    if band.sum() >= 2:
        a, neg_b = np.polyfit(1.0 / wavelen[band], s, 1)
        if neg_b < 0:
            high = 1.0 - 1.0 / neg_b
            out.append(RopeScaling("llama3", factor, 1.0, round(float(high), 4), int(round(-a / neg_b))))
    elif band.sum() == 1:  # keep the usual high/low = 4 and place the band around the entry
        out.append(RopeScaling("llama3", factor, 1.0, 4.0, int(round(wavelen[band][0] * (3 * s[0] + 1)))))
    else:  # a plain step from 1 to factor between two wavelengths
        w1, w2 = wavelen[divisors <= 1.0 + 1e-4].max(), wavelen[divisors >= factor * (1 - 1e-4)].min()
        orig = int(np.floor(w2))
        out.append(RopeScaling("llama3", factor, 1.0, float(orig / w1) * (1 - 1e-6), orig))
    return out


def llama3_freq_divisors(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """What convert_hf_to_gguf writes to rope_freqs.weight for "llama3" scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    out = np.where(
        wavelen < high_wavelen,
        1.0,
        np.where(wavelen > low_wavelen, s.factor, 1 / ((1 - smooth) / s.factor + smooth)),
    )
    return out.astype(np.float32)
