"""A plain numpy forward pass over LoadedWeights: the model-loading tests' oracle.

Written from the ModelConfig/weights contract only (canonical names, effective RMSNorm
weights, NeoX rotary layout), so comparing it with transformers checks the loaders' mapping.
"""

from __future__ import annotations

import numpy as np

from localserve.models.config import ModelConfig, RopeScaling
from localserve.models.weights import LoadedWeights


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def inv_freq(cfg: ModelConfig, sliding: bool) -> np.ndarray:
    theta = cfg.rope_local_theta if sliding and cfg.rope_local_theta else cfg.rope_theta
    f = 1.0 / theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    s: RopeScaling | None = None if sliding else cfg.rope_scaling
    if s is None:
        return f
    if s.kind == "linear":
        return f / s.factor
    wavelen = 2 * np.pi / f
    low, high = s.original_max_position / s.low_freq_factor, s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    mid = (1 - smooth) * f / s.factor + smooth * f
    return np.where(wavelen < high, f, np.where(wavelen > low, f / s.factor, mid))


def rope(x: np.ndarray, pos: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """x [T, H, D] in the rotate_half layout."""
    ang = pos[:, None] * freqs[None, :]  # [T, D/2]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def act(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "silu":
        return x / (1 + np.exp(-x))
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def forward(w: LoadedWeights, tokens: list[int]) -> np.ndarray:
    """Logits [T, vocab] of one sequence at positions 0..T-1 (float64)."""
    cfg = w.config
    d = {name: w.dense(name).astype(np.float64) for name in w.tensors}
    T, H, K, D = len(tokens), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = np.arange(T, dtype=np.float64)
    x = d["token_embd.weight"][tokens] * (cfg.embedding_scale or 1.0)
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        sliding = cfg.layer_is_sliding[i]
        h = rms_norm(x, d[p + "attn_norm.weight"], cfg.rms_norm_eps)
        q, k, v = (h @ d[f"{p}attn_{n}.weight"].T for n in "qkv")
        if cfg.qkv_bias:
            q, k, v = (t + d[f"{p}attn_{n}.bias"] for t, n in zip((q, k, v), "qkv"))
        q, k, v = q.reshape(T, H, D), k.reshape(T, K, D), v.reshape(T, K, D)
        if cfg.qk_norm:
            q = rms_norm(q, d[p + "attn_q_norm.weight"], cfg.rms_norm_eps)
            k = rms_norm(k, d[p + "attn_k_norm.weight"], cfg.rms_norm_eps)
        freqs = inv_freq(cfg, sliding)
        q, k = rope(q, pos, freqs), rope(k, pos, freqs)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) * cfg.scale
        qi, kj = np.arange(T)[:, None], np.arange(T)[None, :]
        visible = kj <= qi
        if sliding and cfg.sliding_window:
            visible &= qi - kj < cfg.sliding_window
        scores = np.where(visible[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", probs, v).reshape(T, H * D) @ d[p + "attn_output.weight"].T
        if cfg.post_norms:
            o = rms_norm(o, d[p + "post_attention_norm.weight"], cfg.rms_norm_eps)
        x = x + o
        h = rms_norm(x, d[p + "ffn_norm.weight"], cfg.rms_norm_eps)
        f = (act(h @ d[p + "ffn_gate.weight"].T, cfg.hidden_act) * (h @ d[p + "ffn_up.weight"].T)) @ d[
            p + "ffn_down.weight"
        ].T
        if cfg.post_norms:
            f = rms_norm(f, d[p + "post_ffw_norm.weight"], cfg.rms_norm_eps)
        x = x + f
    x = rms_norm(x, d["output_norm.weight"], cfg.rms_norm_eps)
    out = d["token_embd.weight"] if cfg.tie_word_embeddings else d["output.weight"]
    logits = x @ out.T
    if cfg.final_logit_softcapping:
        c = cfg.final_logit_softcapping
        logits = np.tanh(logits / c) * c
    return logits


def greedy(w: LoadedWeights, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(forward(w, tokens)[-1].argmax()))
    return tokens[len(prompt) :]
