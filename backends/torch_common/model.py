"""One decoder for gemma3 and the Llama family (llama, mistral, qwen2, qwen3), driven by ModelConfig.

Works on the flattened token batch of a `Plan` with paged KV. Per-step work that does not
depend on the layer (embedding, rope cos/sin for both rope kinds, attention metadata,
which rows need logits) happens once in `prepare`; `forward` is then a plain loop over
layers. Only the rows that will be sampled go through the final norm and the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from localserve.engine.plan import Plan
from localserve.models.config import ModelConfig

from .attention import AttentionMetadata, PagedAttention
from .layers import rms_norm
from .rope import RotaryTable, apply_rotary
from .weights import LayerWeights, TorchWeights


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # long [T]
    rope_full: tuple[torch.Tensor, torch.Tensor]  # cos, sin [T, 1, D/2] for global layers
    rope_sliding: tuple[torch.Tensor, torch.Tensor]  # for sliding-window layers
    attn: AttentionMetadata
    logits_rows: torch.Tensor  # long [S]: last token row of each sampled sequence


class DecoderModel:
    def __init__(self, cfg: ModelConfig, weights: TorchWeights, attention: PagedAttention,
                 dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.w = weights
        self.attention = attention
        self.dtype = dtype
        self.rope_full = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if cfg.rope_local_theta is not None:
            self.rope_sliding = RotaryTable(cfg.head_dim, cfg.rope_local_theta, None)
        else:
            self.rope_sliding = self.rope_full
        self.act = (
            (lambda g: F.gelu(g, approximate="tanh"))
            if cfg.hidden_act == "gelu_tanh"
            else F.silu
        )
        assert cfg.hidden_act in ("gelu_tanh", "silu"), cfg.hidden_act

    def prepare(self, plan: Plan) -> StepInputs:
        positions = torch.from_numpy(plan.positions.astype(np.int64))
        max_pos = int(plan.positions.max()) if plan.num_tokens else 0
        full = self.rope_full.lookup(positions, max_pos)
        sliding = full if self.rope_sliding is self.rope_full else self.rope_sliding.lookup(
            positions, max_pos
        )
        rows = plan.query_start_loc[plan.sample_idx.astype(np.int64) + 1].astype(np.int64) - 1
        return StepInputs(
            input_ids=torch.from_numpy(plan.input_ids.astype(np.int64)),
            rope_full=_cast(full, self.dtype),
            rope_sliding=_cast(sliding, self.dtype),
            attn=self.attention.prepare(plan),
            logits_rows=torch.from_numpy(rows),
        )

    def forward(self, step: StepInputs, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits float32 [S, vocab] for step.logits_rows."""
        h = self.w.embed(step.input_ids)
        for i, lw in enumerate(self.w.layers):
            h = self._layer(i, lw, h, step, kv[i])
        if step.logits_rows.numel() == 0:  # a step of mid-prompt chunks only
            return torch.empty(0, self.cfg.vocab_size)
        return self.logits(h[step.logits_rows])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h, self.w.final_norm, self.cfg.rms_norm_eps)
        out = self.w.lm_head(h).float()
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    def _layer(self, i: int, lw: LayerWeights, h: torch.Tensor, step: StepInputs,
               kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        t = h.shape[0]
        sliding = cfg.layer_is_sliding[i]

        x = rms_norm(h, lw.attn_norm, eps)
        q, k, v = lw.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if lw.q_norm is not None:
            q = rms_norm(q, lw.q_norm, eps)
            k = rms_norm(k, lw.k_norm, eps)
        cos, sin = step.rope_sliding if sliding else step.rope_full
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        o = lw.o_proj(self.attention.forward(q, k, v, kv[0], kv[1], step.attn, sliding))
        if lw.post_attn_norm is not None:
            o = rms_norm(o, lw.post_attn_norm, eps)
        h = h + o

        x = rms_norm(h, lw.ffn_norm, eps)
        gate, up = lw.gate_up(x).chunk(2, dim=-1)
        x = lw.down(self.act(gate) * up)
        if lw.post_ffw_norm is not None:
            x = rms_norm(x, lw.post_ffw_norm, eps)
        return h + x


def _cast(pair: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype):
    return pair[0].to(dtype), pair[1].to(dtype)
