"""CUDABackend: torch_common's decoder on an NVIDIA GPU, dense bf16/fp16 (fp32 for conformance).

Attention, in order of preference (attention_choice.py; each falls back to the next with a logged reason, at load
or at the warm-up; never at a request): FlashInfer (bf16/fp16 only) → the Triton kernel →
torch SDPA over gathered pages. In bf16/fp16 the elementwise work of a layer runs in fused
Triton kernels (fused_model.py; dropped with a logged reason if they fail in the warm-up;
LOCALSERVE_FUSED=0/1 overrides). Decode steps replay CUDA graphs over padded batch-size buckets;
the other steps up to 2,048 tokens (prefill, mixed, larger decode) replay piecewise graphs over
padded token-count buckets, the attention eager between them (piecewise.py).
`kv_dtype="fp8"`: e4m3 KV pages on FP8 GPUs (FlashInfer and the Triton kernel read them).
Sampling runs on the device (torch_common.sampling): only the sampled ids reach the host.
Every per-step host-to-device input goes through pinned, double-buffered staging (staging.py;
LOCALSERVE_PINNED=0 turns it off for A/B runs), so preparing step N+1 never waits for step N.
`step_events`, when a list, collects (start, end) CUDA events of each step's device work
(benchmarks/scripts/gpu_harness.py's idle share).

Memory: `BackendConfig.memory_utilization` is the fraction of the GPU's total memory this
process may hold (vLLM's --gpu-memory-utilization): the KV pages get what is left of it after
the weights and the peak of a warm-up step of max_num_batched_tokens tokens.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import torch

from localserve import envs
from localserve.backends.torch_common.sampling import sample
from localserve.engine.backend import BackendConfig, Buckets, DeviceInfo, ServingDefaults
from localserve.engine.plan import ForwardOutput, Plan
from localserve.errors import ModelLoadError
from localserve.models.weights import LoadedWeights

from . import device as gpu
from .attention_choice import AttentionChoice
from .batch_shape import MAX_GRAPH_BATCH, BatchShape, recommend_batch_shape
from .fp8 import apply_weight_format, fp8_supported
from .fused_model import FusedDecoderModel
from .graphs import DecodeGraphs, capture_or_none, cascade_graph_buckets, default_buckets
from .inputs import DeviceRope, dummy_plans, step_inputs
from .overlap import PinnedIds, SubmittedStep, sample_on_device
from .piecewise import PiecewiseGraphs, max_tokens_default
from .piecewise import memory_bytes as piecewise_bytes
from .piecewise import capture_or_none as capture_piecewise
from .staging import HostStaging
from .weights import build_device_weights

log = logging.getLogger("localserve.backends.cuda")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# slack kept free of KV pages: CUDA graphs' pool, allocator fragmentation, cuBLAS workspaces
_RESERVE_BYTES = 1 << 30
ATTENTION_ORDER = ("flashinfer", "triton", "torch")


class CUDABackend(AttentionChoice):
    name: ClassVar[str] = "cuda"
    platform: ClassVar[str] = "cuda"  # what device discovery looks for (rocm: "rocm")
    attention_order: ClassVar[tuple[str, ...]] = ATTENTION_ORDER

    def __init__(self, device: str | torch.device | None = None) -> None:
        # `device` is for tests: "cpu" runs the same code with Triton's interpreter
        self._device_override = torch.device(device) if device is not None else None
        self.device = torch.device("cpu")
        self.cfg = BackendConfig()
        self.model: FusedDecoderModel | None = None
        self.weights: LoadedWeights | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv_dtype = torch.bfloat16
        self.rope: DeviceRope | None = None
        self.graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None  # the other steps' graphs (piecewise.py)
        self.attention_name = ""
        self.fallbacks: list[str] = []  # why each preferred attention was skipped
        self.block_size = 16
        self.num_blocks = 0
        self._activation_peak = 0
        self._warmed = False
        # (start, end) CUDA events of each step's device work, when a benchmark asks
        self.step_events: list | None = None
        # overlap scheduling: the last submitted step's sampled ids (device), and an event
        # after its host-staged inputs were copied
        self._last_ids: torch.Tensor | None = None
        self._staged = None
        self.staging: HostStaging | None = None  # set at load, on the chosen device
        self._pinned_ids = PinnedIds()  # where each step's sampled ids land on the host

    # -- discovery --------------------------------------------------------------------
    @classmethod
    def probe(cls) -> list[DeviceInfo]:
        return gpu.device_infos(cls.platform)

    @classmethod
    def serving_defaults(cls) -> ServingDefaults:
        """The recommended batch shape (batch_shape.py: 1,024 sequences, 8,192 tokens a step,
        measured best for 1,000 concurrent prompts on the H100), and 0.9 of the GPU's memory for
        weights, graphs, workspace and KV pages together (vLLM's --gpu-memory-utilization)."""
        shape = recommend_batch_shape()
        return ServingDefaults(max_num_seqs=shape.max_num_seqs, max_num_batched_tokens=shape.max_num_batched_tokens,
                               memory_utilization=0.9)

    # -- load -------------------------------------------------------------------------
    def load(self, model: LoadedWeights, cfg: BackendConfig) -> None:
        self.cfg = cfg
        if self._device_override is not None:
            self.device = self._device_override
        else:
            reason = gpu.gpu_unavailable_reason(self.platform)
            if reason is not None:
                raise ModelLoadError(model.source, f"the {self.name} backend cannot run here: "
                                     f"{reason}; use --backend cpu")
            self.device = torch.device("cuda", cfg.device_index)
            torch.cuda.set_device(self.device)
            # fp32 conformance must be true fp32 (no TF32 in matmuls)
            torch.backends.cuda.matmul.allow_tf32 = False
        self.staging = HostStaging(self.device)
        dtype = self._dtype(cfg)
        self.kv_dtype = self._kv_dtype(cfg, dtype)
        self.weights = model
        w = build_device_weights(model, dtype, self.device)
        self.weight_format = apply_weight_format(cfg.weight_format, w, self.device, dtype,
                                                 self.fallbacks)
        mc = model.config
        self.model = FusedDecoderModel(mc, w, None, dtype)  # attention chosen below
        self.rope = DeviceRope(self.model, mc.max_context, self.device)
        self._select_attention(self._attention_candidates(dtype))

    def _dtype(self, cfg: BackendConfig) -> torch.dtype:
        if cfg.dtype in _DTYPES:
            return _DTYPES[cfg.dtype]
        if self.device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _kv_dtype(self, cfg: BackendConfig, dtype: torch.dtype) -> torch.dtype:
        """The KV pages' dtype: "fp8" is e4m3 (saturating writes, scale 1, as vLLM's fp8 KV
        cache without calibrated scales) where the GPU has FP8 and the compute dtype is
        bf16/fp16; else the compute dtype with a note. FlashInfer and the Triton kernel read
        e4m3 pages; the torch attention does not, and drops back to the compute dtype."""
        if cfg.kv_dtype == "fp8":
            if fp8_supported(self.device) and dtype != torch.float32:
                return torch.float8_e4m3fn
            self.fallbacks.append("fp8 KV cache: needs an FP8 GPU (compute capability 8.9+) "
                                  "and a bf16/fp16 dtype; the compute dtype instead")
        return _DTYPES.get(cfg.kv_dtype, dtype)

    # -- memory -----------------------------------------------------------------------
    def _kv_bytes_per_block(self, block_size: int) -> int:
        el = torch.empty(0, dtype=self.kv_dtype).element_size()
        return self.model.cfg.kv_bytes_per_token(el) * block_size

    @torch.inference_mode()
    def kv_capacity(self, block_size: int) -> int:
        """Blocks that fit in memory_utilization x total after weights and a warm-up step."""
        assert self.model is not None, "load() first"
        self._warm_up(block_size)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the warm-up's pages and activations go back to the driver
        free, total = gpu.memory_report(self.device)
        if self.device.type == "cpu":
            budget = int(free * self.cfg.memory_utilization)
        else:
            used = total - free  # weights, context, workspaces, other processes
            budget = int(total * self.cfg.memory_utilization) - used - self._activation_peak - _RESERVE_BYTES
            if self._use_piecewise():  # their buffers and pool are taken after the pages
                budget -= piecewise_bytes(self.model.cfg,
                                          max_tokens_default(self.cfg.max_num_batched_tokens),
                                          self.model.dtype.itemsize)
        blocks = budget // self._kv_bytes_per_block(block_size) - 1  # one scratch block
        if blocks < 1:
            need = self._kv_bytes_per_block(block_size) * 2 - budget
            raise ModelLoadError(self.weights.source, gpu.out_of_memory_message(
                "for the KV cache", need + max(budget, 0), max(budget, 0), total,
                f"raise memory_utilization (now {self.cfg.memory_utilization}) or lower "
                f"max_num_batched_tokens (now {self.cfg.max_num_batched_tokens})"))
        return int(blocks)

    def _warm_up(self, block_size: int) -> None:
        """Runs a prefill of max_num_batched_tokens tokens over max_num_seqs sequences on
        throw-away pages: measures the activation peak, compiles JIT kernels, and moves to the
        next attention implementation if this one fails."""
        self._warmed = True
        tokens = max(1, self.cfg.max_num_batched_tokens)
        seqs = max(1, min(self.cfg.max_num_seqs, tokens))
        suspect = None  # a failure with the fused kernels on, retried without them
        while True:
            kv = None
            try:
                kv = self._allocate_kv(tokens // block_size + 2 * seqs + 1, block_size)
                base = self._allocated()
                self._reset_peak()
                self._run_dummy_steps(kv, tokens, seqs, block_size)
                self._activation_peak = max(0, self._peak() - base)
                self._check_cascade(kv, block_size)
                if suspect is not None:  # it works without them: they were the cause
                    self._note_fallback("fused kernels", suspect)
                return
            except torch.cuda.OutOfMemoryError as exc:
                free, total = gpu.memory_report(self.device)
                raise ModelLoadError(self.weights.source, gpu.out_of_memory_message(
                    f"in a warm-up step of {tokens} tokens", self._peak(), free, total,
                    "lower max_num_batched_tokens or max_num_seqs")) from exc
            except Exception as exc:
                if self.model.fused:  # first the same attention without the fused kernels
                    suspect = exc
                    self.model.fused = False
                    continue
                suspect = None  # the attention itself fails: the next one (fused again)
                order = list(self.attention_order)
                rest = order[order.index(self.attention_name) + 1:]
                self._note_fallback(self.attention_name, exc)
                if not rest:
                    raise
                self._select_attention(rest)
            finally:
                del kv

    def _run_dummy_steps(self, kv, tokens: int, seqs: int, block_size: int) -> None:
        """A prefill of `tokens` tokens over `seqs` sequences, then one decode step of each."""
        lens = np.full(seqs, tokens // seqs, dtype=np.int64)
        lens[: tokens % seqs] += 1
        lens = lens[lens > 0]
        for plan in dummy_plans(lens, block_size, self.model.cfg.vocab_size):
            step = step_inputs(plan, self.model, self.rope, self.device)
            logits = self.model.forward(step, kv)
            sample(logits, plan.sampling)
            self._sync()

    def _allocate_kv(self, num_blocks: int, block_size: int):
        mc = self.model.cfg
        cache = torch.zeros((mc.num_layers, 2, num_blocks * block_size, mc.num_kv_heads,
                             mc.head_dim), dtype=self.kv_dtype, device=self.device)
        return [(cache[i, 0], cache[i, 1]) for i in range(mc.num_layers)]

    @torch.inference_mode()
    def init_kv(self, num_blocks: int, block_size: int) -> None:
        assert self.model is not None, "load() first"
        if not self._warmed:  # the engine was given num_blocks and skipped kv_capacity()
            self._warm_up(block_size)
        if self.kv and (num_blocks, block_size) == (self.num_blocks, self.block_size):
            return  # a new engine over this backend: the pages and graphs stay valid
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = []
        self.graphs = self.piecewise = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the old pages go back before the new ones are taken
        try:
            # one more block than the engine's: the scratch page padded graph rows write to
            self.kv = self._allocate_kv(num_blocks + 1, block_size)
        except torch.cuda.OutOfMemoryError as exc:
            free, total = gpu.memory_report(self.device)
            raise ModelLoadError(self.weights.source, gpu.out_of_memory_message(
                f"allocating {num_blocks} KV blocks", self._kv_bytes_per_block(block_size) * (num_blocks + 1),
                free, total, "use fewer blocks or a lower memory_utilization")) from exc
        if self._use_graphs():
            max_blocks = -(-self.model.cfg.max_context // block_size)
            buckets = default_buckets(min(self.cfg.max_num_seqs, MAX_GRAPH_BATCH))
            cascade = (cascade_graph_buckets(buckets)
                       if getattr(self.model.attention, "graph_cascade", False) else ())
            self.graphs = capture_or_none(
                self.model, self.model.attention, self.rope, self.kv, buckets, block_size,
                max_blocks, num_blocks, self.device, staging=self.staging,
                cascade_buckets=cascade)
            if self.graphs is None:
                self.fallbacks.append("cuda graphs: capture failed (see the log)")
        if self._use_piecewise():
            self.piecewise = capture_piecewise(
                self.model, self.kv, max_tokens_default(self.cfg.max_num_batched_tokens),
                num_blocks * block_size, self.device, staging=self.staging,
                pool=self.graphs.pool if self.graphs is not None else None)
            if self.piecewise is None:
                self.fallbacks.append("piecewise cuda graphs: capture failed (see the log)")

    def _use_graphs(self) -> bool:
        if self.device.type != "cuda" or self.cfg.compile == "off":
            return False
        return self.attention_name in ("flashinfer", "triton")

    def _use_piecewise(self) -> bool:
        """Piecewise graphs for the steps decode graphs do not take: with the fused kernels
        (the layer's halves) and graphs on; LOCALSERVE_PIECEWISE=0 turns them off (A/B runs)."""
        return (self._use_graphs() and self.model.fused
                and envs.PIECEWISE.get())

    def recommended_batch_shape(self) -> BatchShape:
        """max_num_seqs / max_num_batched_tokens to use where the user set none (batch_shape.py);
        capped by the KV pool once init_kv has sized it. Apply it to BackendConfig before load
        (the decode graphs are captured up to its max_num_seqs) and to EngineConfig."""
        kv_tokens = self.num_blocks * self.block_size if self.num_blocks else None
        return recommend_batch_shape(kv_tokens)

    def shape_buckets(self) -> Buckets:
        return Buckets(self.graphs.buckets if self.graphs is not None else ())

    # -- the step ---------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: Plan) -> ForwardOutput:
        assert self.model is not None and self.kv, "load() and init_kv() first"
        assert not plan.has_placeholders, "placeholder rows need execute_async"
        if plan.num_tokens == 0:
            return ForwardOutput(token_ids=np.zeros(0, dtype=np.int64))
        events = self.step_events is not None and self.device.type == "cuda"
        logits, start = self._logits(plan, events)
        # ends with the one device-to-host copy of the ids
        out = sample(logits, plan.sampling, argmax_only=plan.argmax_only)
        if events:
            self.step_events.append((start, self._event(True)))
        return out

    @torch.inference_mode()
    def execute_async(self, plan: Plan) -> SubmittedStep:
        """Overlap scheduling: launches the step and returns before its ids reach the host.
        Placeholder rows read the ids of the step submitted just before (kept on the device);
        steps run in submission order on the current stream."""
        assert self.model is not None and self.kv, "load() and init_kv() first"
        events = self.step_events is not None and self.device.type == "cuda"
        if plan.num_tokens == 0:
            self._last_ids = torch.zeros(0, dtype=torch.long, device=self.device)
            return SubmittedStep(self._last_ids, ForwardOutput(token_ids=np.zeros(0, dtype=np.int64)),
                                 None, None)
        # the host buffers the previous step's inputs were staged from (FlashInfer's pinned
        # plan workspace among them) are rewritten below: wait until the device has read them
        if self._staged is not None:
            self._staged.synchronize()
        logits, start = self._logits(plan, events, placeholders=True)
        ids, out = sample_on_device(logits, plan.sampling, plan.argmax_only)
        self._last_ids = ids
        return SubmittedStep(ids, out, self.step_events if events else None, start,
                             self._pinned_ids, self.staging.stream())

    def _logits(self, plan: Plan, events: bool, placeholders: bool = False):
        """(logits [S, vocab] of the plan's sampled rows, the start event or None).
        Every host-to-device copy of the step is queued between staging.begin and end."""
        fill = placeholders and plan.has_placeholders
        st = self.staging
        st.begin()
        shared = self._shared_prefixes(plan)
        if (self.graphs is not None and plan.is_decode_only
                and plan.num_seqs <= self.graphs.max_batch
                and (shared is None or self.graphs.has_cascade(plan.num_seqs, shared.num_groups))):
            # host work: fills the inputs, plans the attention (a cascade graph with shared)
            self.graphs.prepare(plan, shared)
            if fill:
                self._fill_placeholders(self.graphs.input_ids, plan)
            rows = None
            if len(plan.sample_idx) != plan.num_seqs:
                rows = st.to_device(plan.sample_idx, torch.long)
            self._mark_staged(placeholders)
            start = self._event(events)
            logits = self.graphs.replay(plan)
            if rows is not None:
                logits = logits[rows]
        elif self.piecewise is not None and self.piecewise.fits(plan.num_tokens):
            self.piecewise.prepare(plan)  # host work: padded inputs, the attention's plan
            if fill:
                self._fill_placeholders(self.piecewise.input_ids(), plan)
            self._mark_staged(placeholders)
            start = self._event(events)
            logits = self.piecewise.replay()
        else:
            step = step_inputs(plan, self.model, self.rope, self.device, st)
            if fill:
                self._fill_placeholders(step.input_ids, plan)
            self._mark_staged(placeholders)
            start = self._event(events)
            logits = self.model.forward(step, self.kv)
        return logits, start

    def _shared_prefixes(self, plan: Plan):
        """The step's shared-prefix groups when its decode reads them once (cascade.py), else
        None. A cascaded step replays its bucket's cascade graph, or runs eager without one."""
        policy = getattr(self.model.attention, "cascade", None)
        shared = None if policy is None else policy.shared_prefixes(plan)
        if shared is not None and not policy.eager and not (
                self.graphs is not None and self.graphs.has_cascade(plan.num_seqs, shared.num_groups)):
            policy.decline(plan)  # no graph for it: the plain graph (or eager plain) path
            return None
        return shared

    def _fill_placeholders(self, input_ids: torch.Tensor, plan: Plan) -> None:
        """input_ids[placeholder_rows] = the previous step's sampled ids[placeholder_src], on
        the device, ordered after that step's sampling by the stream."""
        rows, src = plan.placeholder_rows, plan.placeholder_src
        n = len(rows)
        # rows ascend, so rows[-1] == n - 1 means rows == 0..n-1; with src == rows (a decode
        # batch in the previous step's order, the steady state) it is a prefix copy
        if int(rows[-1]) == n - 1 and n <= len(self._last_ids) and np.array_equal(src, rows):
            input_ids[:n].copy_(self._last_ids[:n])
            return
        idx = self.staging.to_device(np.stack([rows, src]), torch.long)
        input_ids.index_copy_(0, idx[0], self._last_ids.index_select(0, idx[1]))

    def _mark_staged(self, overlapped: bool) -> None:
        """Ends the staging bracket; under overlap keeps its event: FlashInfer's own pinned
        plan buffer (one per wrapper) is rewritten by the next plan, which waits for it."""
        ev = self.staging.end()
        self._staged = ev if overlapped else None

    def _event(self, record: bool):
        if not record:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.staging.stream())
        return ev

    def close(self) -> None:
        self.graphs = self.piecewise = None
        self.kv = []
        self.model = None
        self.rope = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- small helpers ----------------------------------------------------------------
    def describe(self) -> dict:
        """What this backend runs with (for logs and benchmark reports)."""
        return {
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "dtype": str(self.model.dtype).removeprefix("torch.") if self.model else None,
            "weights": getattr(self, "weight_format", "dense"),
            "kv_dtype": str(self.kv_dtype).removeprefix("torch."),
            "attention": self.attention_name,
            "cuda_graphs": list(self.graphs.buckets) if self.graphs else [],
            "piecewise_graphs": list(self.piecewise.buckets) if self.piecewise else [],
            "fallbacks": list(self.fallbacks),
            "num_blocks": self.num_blocks,
            "activation_peak_gib": round(self._activation_peak / gpu.GiB, 3),
        }

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
