"""Conformance of a GPU backend against the CPU reference, driven through LLMEngine.

On the same small random weights: identical greedy tokens to CPUBackend (dense float32); the
same tokens batched as alone; a prefix-cache hit gives the cold run's tokens; and, for low
precision, last-row logits within a relative tolerance of the float32 reference. Used by
tests/backends/test_cuda_backend.py (on the CPU under Triton's interpreter, and on a GPU) and
by benchmarks/scripts/gpu_bench.py on the device machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from localserve.engine.backend import BackendConfig
from localserve.engine.llm_engine import EngineConfig, LLMEngine
from localserve.engine.sampling_params import SamplingParams
from localserve.models.loader import load_weights
from localserve.models.weights import LoadedWeights

BLOCK_SIZE = 16
NUM_BLOCKS = 96
MAX_NEW = 24


@dataclass(slots=True)
class Check:
    model: str
    name: str
    ok: bool
    detail: str = ""
    # reported, not required: in bf16 a batch changes GEMM shapes and so rounding, and greedy
    # tokens of tiny random models can flip at near-ties (no engine is batch-invariant there)
    informational: bool = False


@dataclass(slots=True)
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if not c.informational)

    def add(self, model: str, name: str, ok: bool, detail: str = "",
            informational: bool = False) -> None:
        self.checks.append(Check(model, name, bool(ok), detail, informational))

    def lines(self) -> list[str]:
        def tag(c: Check) -> str:
            return ("PASS" if c.ok else "FAIL") + ("(info)" if c.informational else "")

        return [f"{tag(c)} {c.model:12s} {c.name:22s} {c.detail}" for c in self.checks]


def tiny_weights(name: str) -> LoadedWeights:
    """A tiny random preset with norm weights around 1 (presets fill them with exactly 1).

    "tiny-llama@128/1" is the preset with head_dim 128 and 1 KV head: the head dims and GQA
    groups FlashInfer has kernels for (and the same JIT modules as the full-size models)."""
    base, _, variant = name.partition("@")
    w = load_weights(f"random:{base}")
    if variant:
        from localserve.models.gguf_loader import expected_tensor_names
        from localserve.models.presets import _random_tensor

        head_dim, _, kv_heads = variant.partition("/")
        hd = int(head_dim)
        cfg = dataclasses.replace(
            w.config, head_dim=hd, num_kv_heads=int(kv_heads or w.config.num_kv_heads),
            attn_scale=None if w.config.attn_scale is None else hd ** -0.5)
        w = dataclasses.replace(w, config=cfg, tensors={
            t: _random_tensor(cfg, base, t) for t in expected_tensor_names(cfg)})
    rng = np.random.default_rng(7)
    tensors = dict(w.tensors)
    for n in tensors:
        if n.endswith("norm.weight"):
            tensors[n] = (1.0 + 0.3 * rng.standard_normal(tensors[n].shape)).astype(np.float32)
    return dataclasses.replace(w, tensors=tensors)


def _engine(backend, weights: LoadedWeights, cfg: BackendConfig, prefix_cache: bool) -> LLMEngine:
    backend.load(weights, cfg)
    return LLMEngine(backend, weights.config, None, EngineConfig(
        block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, enable_prefix_cache=prefix_cache))


def _greedy(engine: LLMEngine, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    return [list(r[0].output_token_ids) for r in engine.generate(prompts, params)]


def _prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def _cpu_reference():
    from localserve.backends.cpu import CPUBackend

    return CPUBackend(), BackendConfig(dtype="float32", weight_format="dense", compile="off",
                                       num_threads=1, max_num_batched_tokens=64, max_num_seqs=8)


def run_conformance(make_backend: Callable[[], object], models=("tiny-llama", "tiny-gemma3"),
                    dtype: str = "float32", compile: str = "auto",
                    logits_rtol: float | None = None, max_new: int = MAX_NEW,
                    lengths=(5, 19, 33, 47), kv_dtype: str = "auto") -> Report:
    """Checks `make_backend()` instances (fresh for every engine) against CPUBackend.

    dtype float32: tokens must equal the reference. Lower precision: pass logits_rtol, and the
    token checks are made between runs of the backend itself (batched vs alone, hit vs cold).
    """
    report = Report()
    cfg = BackendConfig(dtype=dtype, compile=compile, max_num_batched_tokens=64, max_num_seqs=8,
                        kv_dtype=kv_dtype)
    for name in models:
        weights = tiny_weights(name)
        vocab = weights.config.vocab_size
        # lengths run past tiny-gemma3's window of 16 and across several 16-token pages
        prompts = _prompts(vocab, lengths, seed=1)

        first = make_backend()
        batched = _greedy(_engine(first, weights, cfg, True), prompts, max_new)
        if getattr(first, "piecewise", None) is not None:
            err = piecewise_error(first)
            tol = 1e-5 if dtype == "float32" else logits_rtol or 3e-2
            report.add(name, "piecewise graphs == eager", err <= tol,
                       f"relative logits error {err:.2e} (tolerance {tol:.0e})")
        if dtype == "float32":
            ref_be, ref_cfg = _cpu_reference()
            ref = _greedy(_engine(ref_be, weights, ref_cfg, True), prompts, max_new)
            report.add(name, "greedy == cpu reference", batched == ref,
                       f"{sum(a == b for a, b in zip(batched, ref))}/{len(ref)} sequences equal")
            if not all(len(set(r)) > min(3, max_new // 4) for r in ref):
                report.add(name, "non-degenerate", False, "the reference repeats itself")
        alone_engine = _engine(make_backend(), weights, cfg, False)
        alone = [_greedy(alone_engine, [p], max_new)[0] for p in prompts]
        info = dtype != "float32"
        report.add(name, "batched == alone", batched == alone,
                   f"{sum(a == b for a, b in zip(batched, alone))}/{len(alone)} sequences equal",
                   informational=info)

        shared, tail_a, tail_b = _prompts(vocab, (40, 7, 11), seed=2)
        cold = _greedy(_engine(make_backend(), weights, cfg, False), [shared + tail_b], max_new)[0]
        hot_engine = _engine(make_backend(), weights, cfg, True)
        _greedy(hot_engine, [shared + tail_a], max_new)
        params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
        (req,) = hot_engine.generate([shared + tail_b], params)[0]
        hit = req.num_cached_tokens
        report.add(name, "prefix hit == cold", list(req.output_token_ids) == cold and hit >= 32,
                   f"{hit} prompt tokens from the cache", informational=info and hit >= 32)

        if logits_rtol is not None:
            # the reference gets the same bf16-rounded weights: what is left is the kernels'
            # low-precision arithmetic, not the rounding of the weights themselves
            err = logits_error(make_backend(), rounded(weights), cfg, prompts[-1])
            report.add(name, "logits vs fp32 cpu", err <= logits_rtol,
                       f"relative error {err:.2e} (tolerance {logits_rtol:.0e})")
    return report


def rounded(weights: LoadedWeights, dtype: str = "bfloat16") -> LoadedWeights:
    """The weights with every tensor rounded to `dtype` and held as float32 arrays."""
    import torch

    tdt = getattr(torch, dtype)
    tensors = {n: torch.from_numpy(np.asarray(weights.dense(n), dtype=np.float32).copy())
               .to(tdt).float().numpy() for n in weights.tensors}
    return dataclasses.replace(weights, tensors=tensors)


def logits_error(backend, weights: LoadedWeights, cfg: BackendConfig, prompt: list[int]) -> float:
    """‖ours − ref‖ / ‖ref‖ over the last-row logits of one cold prefill of `prompt`."""
    import torch

    from .inputs import step_inputs

    plan = _prefill_plan(prompt, weights.config.vocab_size)
    backend.load(weights, cfg)
    backend.init_kv(NUM_BLOCKS, BLOCK_SIZE)
    with torch.inference_mode():
        ours = backend.model.forward(step_inputs(plan, backend.model, backend.rope,
                                                 backend.device), backend.kv).float().cpu()
        ref_be, ref_cfg = _cpu_reference()
        ref_be.load(weights, ref_cfg)
        ref_be.init_kv(NUM_BLOCKS, BLOCK_SIZE)
        ref = ref_be.model.forward(ref_be.model.prepare(plan), ref_be.kv).float()
    backend.close()
    return float((ours - ref).norm() / ref.norm())


def piecewise_error(backend, lens=(9, 14, 3)) -> float:
    """The largest ‖piecewise − eager‖ / ‖eager‖ over the logits, and over the K/V written at
    the step's slots (zeroed between the two runs, so the pieces must write them), of a
    prefill step of sequences of `lens` tokens and of a decode step of each
    (backend.piecewise: its replays, padded to a bucket; eager: model.forward). Overwrites
    the first pages' K/V."""
    from localserve.backends.torch_common.attention import read_pages
    import torch

    from .inputs import dummy_plans, step_inputs

    worst = 0.0
    with torch.inference_mode():
        for plan in dummy_plans(np.asarray(lens), backend.block_size,
                                backend.model.cfg.vocab_size):
            eager = backend.model.forward(step_inputs(plan, backend.model, backend.rope,
                                                      backend.device), backend.kv).float()
            slots = torch.from_numpy(plan.slot_mapping).to(backend.device)
            eager_kv = [read_pages(c, slots).float() for kv in backend.kv for c in kv]
            for kv in backend.kv:
                for c in kv:
                    c.view(torch.uint8)[slots] = 0  # zero bytes: zero in every dtype
            backend.piecewise.prepare(plan)
            ours = backend.piecewise.replay().float()
            ours_kv = [read_pages(c, slots).float() for kv in backend.kv for c in kv]
            worst = max(worst, float((ours - eager).norm() / eager.norm()),
                        *(float((o - e).norm() / e.norm().clamp(min=1e-30))
                          for o, e in zip(ours_kv, eager_kv)))
    return worst


def _prefill_plan(prompt: list[int], vocab: int):
    from localserve.engine.plan import Plan, SamplingRow

    n = len(prompt)
    pos = np.arange(n)
    table = np.arange(-(-n // BLOCK_SIZE), dtype=np.int32)[None, :]
    return Plan(
        seq_ids=[0], input_ids=np.asarray(prompt, dtype=np.int64), positions=pos.astype(np.int64),
        slot_mapping=(table[0, pos // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + pos % BLOCK_SIZE),
        query_start_loc=np.array([0, n], dtype=np.int32), seq_lens=np.array([n], dtype=np.int32),
        block_tables=table, sample_idx=np.array([0], dtype=np.int32),
        sampling=[SamplingRow(params=SamplingParams(temperature=0.0), seed=0, step=0)],
        block_size=BLOCK_SIZE,
    )
