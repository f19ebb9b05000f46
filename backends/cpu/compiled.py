"""torch.compile (inductor, C++ codegen through gcc) of the decode-only step.

Decode steps are where per-op overhead shows: one token per sequence, ~25 small ops per
layer. Inductor fuses the norms, rotary, activations and residual adds around the matmuls.
Prefill and mixed steps stay eager: their matmuls dominate and their shapes vary more.
Batch size and KV length are dynamic, so a few graphs cover every decode step.
"""

from __future__ import annotations

import torch

from localserve.backends.torch_common.model import DecoderModel, StepInputs


class CompiledDecode:
    def __init__(self, model: DecoderModel) -> None:
        self.model = model
        self._fn = torch.compile(model.forward, dynamic=True, fullgraph=False)

    def __call__(self, step: StepInputs, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return self._fn(step, kv)
