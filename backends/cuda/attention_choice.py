"""How the CUDA backend chooses its attention and its fused kernels, and what it notes when
one is unavailable (CUDABackend's `fallbacks`): a mixin, so the choice reads on its own.

The order is the backend's `attention_order` (FlashInfer → the Triton kernel → torch SDPA;
LOCALSERVE_ATTENTION starts it further down). Each candidate that fails to build is noted and
the next one tried; the warm-up (backend.py) can still move on to the next one. The fused
Triton kernels (fused_model.py) run in bf16/fp16 on a GPU whatever the attention.
Uses the backend's cfg, device, model, rope, staging, kv_dtype, fallbacks, attention_name.
"""

from __future__ import annotations

import logging

import torch

from localserve import envs

from .batch_shape import MAX_GRAPH_BATCH, workspace_bytes
from .cascade import CascadePolicy, cascade_bytes_per_token, load_check
from .inputs import DeviceTorchAttention

log = logging.getLogger("localserve.backends.cuda")


class AttentionChoice:
    def _attention_candidates(self, dtype: torch.dtype) -> list[str]:
        forced = envs.ATTENTION.get()
        order = list(self.attention_order)
        if forced:
            if forced not in order:
                raise ValueError(f"LOCALSERVE_ATTENTION={forced!r}: use one of {', '.join(order)}")
            order = order[order.index(forced):]
        if "flashinfer" in order and (dtype == torch.float32 or self.device.type != "cuda"):
            order.remove("flashinfer")
            self.fallbacks.append("flashinfer: needs bf16/fp16 on a CUDA GPU")
        return order

    def _make_attention(self, kind: str):
        mc = self.model.cfg
        window = mc.sliding_window if any(mc.layer_is_sliding) else None
        args = (mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.scale, window)
        if kind == "flashinfer":
            from .flashinfer_attention import FlashInferPagedAttention

            return FlashInferPagedAttention(
                *args, self.model.dtype, self.kv_dtype, self.device,
                backend=envs.FLASHINFER_BACKEND.get(),
                workspace_bytes=workspace_bytes(min(self.cfg.max_num_seqs, MAX_GRAPH_BATCH)))
        if kind == "triton":
            from localserve.backends.triton_kernels import triton_available

            ok, why = triton_available()
            if not ok:
                raise RuntimeError(why)
            from localserve.backends.triton_kernels.attention import TritonPagedAttention

            return TritonPagedAttention(*args, self.device)
        assert kind == "torch", kind
        if self.kv_dtype == getattr(torch, "float8_e4m3fn", None):
            self.kv_dtype = self.model.dtype
            self.fallbacks.append("fp8 KV cache: the torch attention reads no e4m3 pages; "
                                  "the compute dtype instead")
        return DeviceTorchAttention(*args, device=self.device)

    def _select_attention(self, candidates: list[str]) -> None:
        for kind in candidates:
            try:
                self.model.attention = self._make_attention(kind)
                if hasattr(self.model.attention, "staging"):
                    self.model.attention.staging = self.staging
                if hasattr(self.model.attention, "cascade"):
                    self.model.attention.cascade = CascadePolicy(
                        cascade_bytes_per_token(self.model.cfg, self.kv_dtype))
                self.attention_name = kind
                self._choose_fused()
                return
            except Exception as exc:  # ImportError, missing toolchain, unsupported shape...
                self._note_fallback(kind, exc)
        raise RuntimeError("no attention implementation works: " + "; ".join(self.fallbacks))

    def _choose_fused(self) -> None:
        """Triton elementwise kernels (fused_model.py) in bf16/fp16 on a GPU, whatever the
        attention; LOCALSERVE_FUSED=1 forces them (fp32, the interpreter), 0 disables them."""
        self.model.fused = False
        flag = envs.FUSED.get()
        if flag == "0":
            return
        if flag != "1" and (self.device.type != "cuda" or self.model.dtype == torch.float32):
            return
        from localserve.backends.triton_kernels import triton_available

        ok, why = triton_available()
        if not ok:
            self.fallbacks.append(f"fused kernels: {why}")
            return
        try:
            self.model.enable_fused(self.rope)
        except Exception as exc:  # a broken Triton install fails at kernel definition
            self._note_fallback("fused kernels", exc)

    def _note_fallback(self, kind: str, exc: BaseException) -> None:
        msg = f"{kind}: {type(exc).__name__}: {exc}"
        self.fallbacks.append(msg)
        log.warning("attention %s unavailable, falling back: %s", kind, msg)

    def _check_cascade(self, kv, block_size: int) -> None:
        """Shared-prefix decode against the plain decode on the warm-up's pages: dropped with
        a logged reason if it fails or disagrees (decode then reads every row's pages)."""
        why = load_check(self.model, kv, block_size)
        if why is not None:
            self.model.attention.cascade = None
            self._note_fallback("shared-prefix (cascade) decode", RuntimeError(why))
