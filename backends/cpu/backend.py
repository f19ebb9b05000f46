"""CPUBackend: the shared torch decoder on host memory.

weight_format "dense" dequantizes every tensor to float32 (the reference path the
correctness tests compare against HF); "auto" keeps weights quantized in torch's CPU
weight-only kernels, which is what makes memory-bound decode fast on a small CPU.
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

import numpy as np

import torch

from localserve.backends.torch_common.attention import TorchPagedAttention
from localserve.backends.torch_common.model import DecoderModel
from localserve.backends.torch_common.sampling import sample
from localserve.backends.torch_common.weights import WeightFormat, build_torch_weights
from localserve.engine.backend import BackendConfig, Buckets, DeviceInfo, ServingDefaults
from localserve.engine.plan import ForwardOutput, Plan
from localserve.errors import ModelLoadError
from localserve.models.weights import LoadedWeights

from .compiled import CompiledDecode
from .host import available_ram_bytes, physical_cores, total_ram_bytes
from .prepared import PreparedCodes

# "auto" weight format: every linear as GGML Q8_0 (int8 codes, a scale per 32 inputs) run by
# the compiled kernel in localserve.backends.cpu.kernels: block layers with int16-quantized
# activations ("q8k"), the output layer with llama.cpp's int8 activations ("q8k8"). 1.4x the
# single-stream and 2.1x the 16-stream decode speed of "q8" (torch's int4 kernels) at the
# same teacher-forced agreement with dense float32 (top-1 0.970 / KL 0.0012 vs 0.979 /
# 0.0011). All-"q8k" is more accurate (0.987 / 0.0008) but flips a near tie in the greedy
# tracking test. Where the kernel does not build, both mean "q8". See backends/cpu/PERF.md.
AUTO_WEIGHT_FORMAT = "q8k+q8k8"
# "auto" compile: off. Inductor gained ~4% per decode step (the int4 matmuls dominate) for
# ~45 s of compile at start-up; see backends/cpu/PERF.md
AUTO_COMPILE = False
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CPUBackend:
    name: ClassVar[str] = "cpu"

    def __init__(self) -> None:
        self.model: DecoderModel | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv_dtype = torch.float32
        self.cfg = BackendConfig()
        self._decode: CompiledDecode | None = None

    @classmethod
    def probe(cls) -> list[DeviceInfo]:
        return [DeviceInfo(backend=cls.name, name=_cpu_name(), memory_bytes=total_ram_bytes())]

    @classmethod
    def serving_defaults(cls) -> ServingDefaults:
        """32 sequences and 2,048 tokens a step suit a few cores; the KV pages take a quarter of
        the free RAM, which leaves the machine usable."""
        return ServingDefaults(max_num_seqs=32, max_num_batched_tokens=2048, memory_utilization=0.25)

    def load(self, model: LoadedWeights, cfg: BackendConfig) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.num_threads or physical_cores())
        dtype = _DTYPES.get(cfg.dtype, torch.float32)  # "auto": float32 activations
        if cfg.weight_format == "fp8":
            raise ModelLoadError(model.source, "fp8 weights need an NVIDIA GPU with FP8 tensor "
                                 "cores (the cuda backend); use --weights auto on the CPU")
        if cfg.kv_dtype == "fp8":
            raise ModelLoadError(model.source, "an fp8 KV cache needs an NVIDIA GPU with FP8 "
                                 "(the cuda backend); use --kv-dtype auto on the CPU")
        fmt_name = AUTO_WEIGHT_FORMAT if cfg.weight_format == "auto" else cfg.weight_format
        prepared = PreparedCodes.for_model(model.source, fmt_name)
        weights = build_torch_weights(model, WeightFormat.parse(fmt_name), dtype, prepared)
        if prepared is not None:
            prepared.save()
        mc = model.config
        attention = TorchPagedAttention(
            mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.scale,
            mc.sliding_window if any(mc.layer_is_sliding) else None,
        )
        self.model = DecoderModel(mc, weights, attention, dtype)
        self.kv_dtype = _DTYPES.get(cfg.kv_dtype, dtype)
        use_compile = cfg.compile == "on" or (cfg.compile == "auto" and AUTO_COMPILE)
        self._decode = CompiledDecode(self.model) if use_compile else None

    def kv_capacity(self, block_size: int) -> int:
        assert self.model is not None, "load() first"
        per_token = self.model.cfg.kv_bytes_per_token(torch.empty(0, dtype=self.kv_dtype).element_size())
        budget = int(available_ram_bytes() * self.cfg.memory_utilization)
        return max(0, budget // (per_token * block_size))

    def init_kv(self, num_blocks: int, block_size: int) -> None:
        assert self.model is not None, "load() first"
        mc = self.model.cfg
        shape = (mc.num_layers, 2, num_blocks * block_size, mc.num_kv_heads, mc.head_dim)
        cache = lazy_zeros(shape, self.kv_dtype)
        self.kv = [(cache[i, 0], cache[i, 1]) for i in range(mc.num_layers)]

    def shape_buckets(self) -> Buckets:
        return Buckets()

    @torch.inference_mode()
    def execute(self, plan: Plan) -> ForwardOutput:
        assert self.model is not None and self.kv, "load() and init_kv() first"
        if plan.num_tokens == 0:
            return ForwardOutput(token_ids=np.zeros(0, dtype=np.int64))
        step = self.model.prepare(plan)
        if self._decode is not None and plan.is_decode_only:
            logits = self._decode(step, self.kv)
        else:
            logits = self.model.forward(step, self.kv)
        return sample(logits, plan.sampling, argmax_only=plan.argmax_only)

    def close(self) -> None:
        self.model = None
        self.kv = []
        self._decode = None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages the OS supplies on first touch (calloc), instead of a memset of the whole
    pool at start-up (torch.zeros: 2.5 s for the default 5.8 GB pool on 2 cores) that also makes
    all of it resident before a single sequence needs it."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
