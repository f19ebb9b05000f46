"""The device seam: what every backend (cpu, cuda, rocm, tpu, mlx) implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from localserve.engine.plan import ForwardOutput, Plan
from localserve.models.weights import LoadedWeights


@dataclass(slots=True, frozen=True)
class DeviceInfo:
    backend: str
    name: str
    memory_bytes: int  # what the device can hold (host RAM for cpu)
    index: int = 0


@dataclass(slots=True)
class BackendConfig:
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    # weight format the backend computes with: "auto" (its fastest), "dense" (dequantized to
    # dtype: the reference path), "int8", "int4"
    weight_format: str = "auto"
    # KV pages: "auto" (the compute dtype), a dtype name, or "fp8" (e4m3; the CUDA backend on
    # FP8 GPUs, else the compute dtype with a note)
    kv_dtype: str = "auto"
    num_threads: int | None = None  # cpu: intra-op threads; None = all physical cores
    # fraction of device memory the KV pages may take (cpu: of available RAM)
    memory_utilization: float = 0.5
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    compile: str = "auto"  # "auto" | "off" | "on"
    device_index: int = 0


@dataclass(slots=True, frozen=True)
class ServingDefaults:
    """What a backend recommends where the user set nothing: how many sequences run together,
    how many tokens one step may carry, and the share of memory the KV pages take (of the
    accelerator's total memory, as vLLM's --gpu-memory-utilization; of free RAM on the CPU)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    memory_utilization: float


@dataclass(slots=True, frozen=True)
class Buckets:
    """Padded decode batch sizes the backend captures graphs/jits for; empty: any size."""

    decode_batch_sizes: tuple[int, ...] = ()


class StepHandle(Protocol):
    """A step submitted with `execute_async`: `result()` blocks until its sampled ids are on
    the host. Called exactly once, in submission order."""

    def result(self) -> ForwardOutput: ...


@runtime_checkable
class AsyncBackend(Protocol):
    """Optional: a backend that can take step N+1 before step N's ids reach the host
    (overlap scheduling). Steps run in submission order; a plan's placeholder rows read the ids
    sampled by the plan submitted just before it (see Plan.placeholder_rows)."""

    def execute_async(self, plan: Plan) -> StepHandle: ...


@runtime_checkable
class Backend(Protocol):
    name: ClassVar[str]

    @classmethod
    def probe(cls) -> list[DeviceInfo]: ...

    @classmethod
    def serving_defaults(cls) -> ServingDefaults: ...

    def load(self, model: LoadedWeights, cfg: BackendConfig) -> None: ...

    def kv_capacity(self, block_size: int) -> int: ...

    def init_kv(self, num_blocks: int, block_size: int) -> None: ...

    def shape_buckets(self) -> Buckets: ...

    def execute(self, plan: Plan) -> ForwardOutput: ...

    def close(self) -> None: ...
