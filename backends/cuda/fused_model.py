"""FusedDecoderModel: torch_common's decoder with its elementwise work in Triton kernels.

Per layer the torch path launches ~30 kernels (norm casts, rotary slices and cats, the K/V
copies, activation, adds); at batch 1 on an H100 each costs more than the bytes it moves.
Here a layer is: [add+]RMSNorm, qkv GEMM, rope(+qk-norm)+KV write, attention, o GEMM,
[gemma post-norm,] add+RMSNorm, gate|up GEMM, act*mul, down GEMM[, gemma post-norm]: ~10.

At batch 1 and 2 the dense linears run the Triton GEMV (triton_kernels/gemv.py), which reads
weights faster than cuBLAS's kernels for so few rows; the output layer writes its float32
logits directly. LOCALSERVE_GEMV=0 keeps cuBLAS (for A/B runs).

The residual stream is carried as (delta, residual): each layer returns its MLP output
unadded and the next layer's first norm adds it (vLLM's fused_add_rms_norm pattern), so the
add costs no pass of its own. With `fused` False (fp32 conformance, the torch attention,
no Triton) it is exactly DecoderModel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from localserve import envs
from localserve.backends.torch_common.layers import DenseLinear
from localserve.backends.torch_common.model import DecoderModel
from localserve.backends.torch_common.weights import LayerWeights

from .fp8 import Fp8Linear


@dataclass(slots=True)
class FusedStep:
    input_ids: torch.Tensor  # long [T]
    positions: torch.Tensor  # long [T]: rope is looked up inside the kernel
    attn: object  # the attention's metadata (slot_mapping among it)
    logits_rows: torch.Tensor  # long [S]


class FusedDecoderModel(DecoderModel):
    # weights below this many elements stay on cuBLAS at small batches: launch-bound either way
    GEMV_MIN_ELEMENTS = 1 << 22

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fused = False
        self.tables = None  # a DeviceRope, set by the backend with fused
        self.gemv = None  # triton_kernels.gemv with fused, unless LOCALSERVE_GEMV=0
        self.fuse_quant = False  # FP8 linears' quantizer inside the norm / act·mul kernels

    def enable_fused(self, tables) -> None:
        from localserve.backends.triton_kernels import fused as K
        from localserve.backends.triton_kernels import gemv

        self.kernels = K
        self.tables = tables
        self.fused = True
        self.gemv = gemv if envs.GEMV.get() else None
        self.fuse_quant = envs.FP8_FUSED_QUANT.get()

    def quantizes(self, lin) -> bool:
        """Whether the kernel before `lin` hands it e4m3 rows (lin an Fp8Linear)."""
        return self.fuse_quant and isinstance(lin, Fp8Linear)

    def linear(self, lin, x, out: torch.Tensor | None = None) -> torch.Tensor:
        """lin(x), through the GEMV for a large dense weight and at most gemv.MAX_M rows;
        into `out` (float32 logits) when given. x may be (e4m3 codes, scales) for an
        Fp8Linear (a fused kernel quantized it)."""
        if isinstance(x, tuple):
            return lin.mm(*x)
        g = self.gemv
        if (g is not None and 0 < x.shape[0] <= g.MAX_M and isinstance(lin, DenseLinear)
                and lin.weight.numel() >= self.GEMV_MIN_ELEMENTS and x.stride(-1) == 1
                and x.dtype == lin.weight.dtype):
            return g.gemv(x, lin.weight, lin.bias, out=out)
        y = lin(x)
        return y if out is None else out.copy_(y)  # into float32 logits: the cast is the copy

    def forward(self, step, kv: list[tuple[torch.Tensor, torch.Tensor]],
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits float32 [S, vocab]; into `out` when given (the decode graphs' one shared
        buffer: a graph's own output would stay allocated for as long as the graph lives)."""
        if not self.fused:
            logits = super().forward(step, kv)
            return logits if out is None else out.copy_(logits)
        residual = self.w.embed(step.input_ids).contiguous()  # a fresh tensor: updated in place
        delta = None
        for i, lw in enumerate(self.w.layers):
            delta, residual = self._fused_layer(i, lw, delta, residual, step, kv[i])
        if step.logits_rows.numel() == 0:
            return torch.empty(0, self.cfg.vocab_size, device=residual.device)
        rows = step.logits_rows
        return self.head(self.final_norm(delta[rows], residual[rows]), out)

    def _fused_layer(self, i: int, lw: LayerWeights, delta, residual: torch.Tensor, step,
                     kv: tuple[torch.Tensor, torch.Tensor]):
        sliding = self.cfg.layer_is_sliding[i]
        q = self.pre_attention(i, lw, delta, residual, step.positions, step.attn.slot_mapping, kv)
        o = self.attention.attend(q, kv[0], kv[1], step.attn, sliding)
        return self.post_attention(lw, o, residual), residual

    # the two halves of a layer around its attention (piecewise.py captures each pair
    # post_attention(i - 1) + pre_attention(i) as one CUDA graph)
    def pre_attention(self, i: int, lw: LayerWeights, delta, residual: torch.Tensor,
                      positions: torch.Tensor, slot_mapping: torch.Tensor,
                      kv: tuple[torch.Tensor, torch.Tensor],
                      q_out: torch.Tensor | None = None) -> torch.Tensor:
        """[residual += delta,] norm, qkv, rope(+qk-norm) with this step's K/V written into
        the pages; returns the rotated q [T, H, D] (into q_out when given)."""
        K = self.kernels
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        quant = self.quantizes(lw.qkv)
        if delta is None:
            x = K.rms_norm(residual, lw.attn_norm, eps, quant=quant)
        else:
            x = K.add_rms_norm(delta, residual, lw.attn_norm, eps, quant=quant)
        qkv = self.linear(lw.qkv, x)
        q = qkv[:, :cfg.q_size].unflatten(1, (cfg.num_heads, cfg.head_dim))
        k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].unflatten(1, (cfg.num_kv_heads, cfg.head_dim))
        v = qkv[:, cfg.q_size + cfg.kv_size:].unflatten(1, (cfg.num_kv_heads, cfg.head_dim))
        cos, sin = self.tables.sliding if cfg.layer_is_sliding[i] else self.tables.full
        return K.rope_qk_norm_kv_write(q, k, v, positions, cos, sin, slot_mapping, kv[0], kv[1],
                                       lw.q_norm, lw.k_norm, eps, out=q_out)

    def post_attention(self, lw: LayerWeights, o: torch.Tensor,
                       residual: torch.Tensor) -> torch.Tensor:
        """o_proj[, post-norm], residual += o, norm, gated MLP[, post-norm]: the layer's
        output, not yet added to the residual (the next norm adds it)."""
        K = self.kernels
        eps = self.cfg.rms_norm_eps
        o = self.linear(lw.o_proj, o)
        if lw.post_attn_norm is not None:
            o = K.rms_norm(o, lw.post_attn_norm, eps)
        x = K.add_rms_norm(o, residual, lw.ffn_norm, eps, quant=self.quantizes(lw.gate_up))
        act = K.act_mul(self.linear(lw.gate_up, x), self.cfg.hidden_act,
                        quant=self.quantizes(lw.down))
        d = self.linear(lw.down, act)
        if lw.post_ffw_norm is not None:
            d = K.rms_norm(d, lw.post_ffw_norm, eps)
        return d

    def final_norm(self, delta: torch.Tensor, residual: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's output added to the residual, through the final norm."""
        return self.kernels.add_rms_norm(delta, residual, self.w.final_norm,
                                         self.cfg.rms_norm_eps, out=out)

    def head(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [S, vocab] of final-normed rows x (into `out` when given), soft-capped
        where the model says."""
        if out is None:
            out = torch.empty((x.shape[0], self.cfg.vocab_size), dtype=torch.float32,
                              device=x.device)
        out = self.linear(self.w.lm_head, x, out)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            out.div_(cap).tanh_().mul_(cap)
        return out
