"""Per-step inputs on the device: the Plan's token rows, rope cos/sin gathered from device
tables, attention metadata; the padded decode batch that graph replays read; and the dummy
steps the backend warms up with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from localserve.backends.torch_common.attention import (
    AttentionMetadata, DecodeGroup, KeyView, PrefillChunk, TorchPagedAttention,
)
from localserve.backends.torch_common.model import DecoderModel, StepInputs
from localserve.engine.plan import Plan, SamplingRow
from localserve.engine.sampling_params import SamplingParams

from .fused_model import FusedStep


class DeviceRope:
    """A model's rope cos/sin tables on the device for every position of its context, in the
    compute dtype (the same values DecoderModel.prepare casts from its float32 host tables)."""

    def __init__(self, model: DecoderModel, max_positions: int, device: torch.device) -> None:
        def table(rt):
            rt.lookup(torch.zeros(1, dtype=torch.long), max_positions - 1)  # grow the host table
            return (rt.cos[:max_positions].to(device=device, dtype=model.dtype),
                    rt.sin[:max_positions].to(device=device, dtype=model.dtype))

        self.full = table(model.rope_full)
        self.sliding = self.full if model.rope_sliding is model.rope_full else table(model.rope_sliding)

    def gather(self, positions: torch.Tensor):
        """(full, sliding) pairs of cos, sin [T, 1, D/2] for device positions [T]."""
        full = (self.full[0][positions].unsqueeze(1), self.full[1][positions].unsqueeze(1))
        if self.sliding is self.full:
            return full, full
        return full, (self.sliding[0][positions].unsqueeze(1), self.sliding[1][positions].unsqueeze(1))


def to_device(a: np.ndarray, dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(device, non_blocking=True)


def sampled_rows(plan: Plan) -> np.ndarray:
    """The token row whose logits each sampled sequence needs (its last row this step)."""
    return plan.query_start_loc[plan.sample_idx.astype(np.int64) + 1].astype(np.int64) - 1


def step_inputs(plan: Plan, model: DecoderModel, rope: DeviceRope, device: torch.device,
                staging=None):
    """The model's per-step inputs on the device (attention planned once for the step);
    through `staging` (a HostStaging) when given, else from pageable numpy."""
    if staging is None:
        def put(a):
            return to_device(a, np.int64, device)
    else:
        def put(a):
            return staging.to_device(a, torch.long)
    return make_step(model, rope, put(plan.input_ids), put(plan.positions),
                     model.attention.prepare(plan), put(sampled_rows(plan)))


def make_step(model: DecoderModel, rope: DeviceRope, input_ids: torch.Tensor,
              positions: torch.Tensor, attn, logits_rows: torch.Tensor):
    """FusedStep for a fused model (rope is looked up in its kernel), else StepInputs with
    the cos/sin rows gathered."""
    if getattr(model, "fused", False):
        return FusedStep(input_ids=input_ids, positions=positions, attn=attn,
                         logits_rows=logits_rows)
    full, sliding = rope.gather(positions)
    return StepInputs(input_ids=input_ids, rope_full=full, rope_sliding=sliding, attn=attn,
                      logits_rows=logits_rows)


class DeviceTorchAttention(TorchPagedAttention):
    """torch_common's SDPA attention with its metadata moved to the device: the last fallback
    when neither FlashInfer nor Triton runs (no graphs: its shapes change every step)."""

    name = "torch"

    def __init__(self, *args, device: torch.device) -> None:
        super().__init__(*args)
        self.device = device

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, sliding: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over caches that already hold this step's K/V (the fused kernels wrote
        them): the rows are read back and rewritten unchanged by forward's copy. Into `out`
        ([T, H * D]) when given."""
        slots = meta.slot_mapping
        o = self.forward(q, k_cache[slots], v_cache[slots], k_cache, v_cache, meta, sliding)
        return o if out is None else out.copy_(o)

    def prepare(self, plan: Plan) -> AttentionMetadata:
        meta = super().prepare(plan)
        dev = self.device

        def view(v: KeyView | None) -> KeyView | None:
            return None if v is None else KeyView(v.slots.to(dev), v.mask.to(dev))

        dec = meta.decode
        return AttentionMetadata(
            slot_mapping=meta.slot_mapping.to(dev),
            decode=None if dec is None else DecodeGroup(dec.rows.to(dev), view(dec.full),
                                                        view(dec.sliding)),
            prefills=[PrefillChunk(c.start, c.end, view(c.full), view(c.sliding))
                      for c in meta.prefills],
        )


@dataclass(slots=True)
class PaddedDecode:
    """A decode-only plan padded to a graph's batch size: pad rows decode token 0 at position 0
    on the scratch page, whose K/V nothing else reads."""

    batch_size: int
    input_ids: np.ndarray  # int64 [bs]
    positions: np.ndarray  # int64 [bs]
    slot_mapping: np.ndarray  # int64 [bs]
    seq_lens: np.ndarray  # int32 [bs]
    block_tables: np.ndarray  # int32 [bs, w]

    @classmethod
    def from_plan(cls, plan: Plan, batch_size: int, scratch_block: int) -> "PaddedDecode":
        b = plan.num_seqs
        bs = plan.block_size
        width = max(1, -(-int(plan.seq_lens.max()) // bs))
        pad = batch_size - b
        tables = np.full((batch_size, width), scratch_block, dtype=np.int32)
        tables[:b] = plan.block_tables[:, :width]
        return cls(
            batch_size=batch_size,
            input_ids=np.concatenate([plan.input_ids, np.zeros(pad, np.int64)]),
            positions=np.concatenate([plan.positions, np.zeros(pad, np.int64)]),
            slot_mapping=np.concatenate([plan.slot_mapping,
                                         np.full(pad, scratch_block * bs, np.int64)]),
            seq_lens=np.concatenate([plan.seq_lens, np.ones(pad, np.int32)]).astype(np.int32),
            block_tables=tables,
        )

    @classmethod
    def dummy(cls, batch_size: int, block_size: int, scratch_block: int) -> "PaddedDecode":
        """Every row a pad row: what graphs are captured with."""
        return cls(
            batch_size=batch_size,
            input_ids=np.zeros(batch_size, np.int64),
            positions=np.zeros(batch_size, np.int64),
            slot_mapping=np.full(batch_size, scratch_block * block_size, np.int64),
            seq_lens=np.ones(batch_size, np.int32),
            block_tables=np.full((batch_size, 1), scratch_block, np.int32),
        )


def dummy_plans(lens: np.ndarray, block_size: int, vocab_size: int) -> tuple[Plan, Plan]:
    """Warm-up steps: a cold prefill of sequences of `lens` tokens on consecutive pages, then one decode step
    of each; every sequence is sampled greedily in both."""
    nblocks = (lens + block_size) // block_size  # room for the decode token
    first = np.concatenate([[0], np.cumsum(nblocks)[:-1]])
    tables = (first[:, None] + np.arange(int(nblocks.max()))[None, :]).astype(np.int32)
    greedy = SamplingParams(temperature=0.0, max_tokens=2)
    rows = [SamplingRow(params=greedy, seed=0, step=0) for _ in lens]
    rng = np.random.default_rng(0)

    def plan(positions: np.ndarray, seq_of_row: np.ndarray, qlens: np.ndarray, seq_lens) -> Plan:
        slots = tables[seq_of_row, positions // block_size].astype(np.int64) * block_size \
            + positions % block_size
        return Plan(
            seq_ids=list(range(len(lens))),
            input_ids=rng.integers(0, vocab_size, len(positions)).astype(np.int64),
            positions=positions.astype(np.int64), slot_mapping=slots,
            query_start_loc=np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32),
            seq_lens=np.asarray(seq_lens, dtype=np.int32), block_tables=tables,
            sample_idx=np.arange(len(lens), dtype=np.int32), sampling=rows, block_size=block_size,
        )

    prefill = plan(np.concatenate([np.arange(n) for n in lens]),
                   np.repeat(np.arange(len(lens)), lens), lens, lens)
    decode = plan(lens.copy(), np.arange(len(lens)), np.ones_like(lens), lens + 1)
    return prefill, decode
