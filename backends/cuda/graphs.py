"""CUDA graphs for decode steps, one per padded batch size (bucket).

A decode step of B sequences replays the graph of the smallest bucket >= B: the host writes
the padded token ids, positions and slots into the graph's static input buffers, refills the
attention metadata (FlashInfer re-plans into fixed buffers; Triton reads device seq_lens and
block tables), replays, and reads the first B rows of the static logits. The whole forward
(embedding, every layer, final norm, output layer) is one graph launch; sampling runs after it.
"""

from __future__ import annotations

import logging

import torch

from localserve.backends.torch_common.model import DecoderModel

from .cascade import graph_max_groups
from .inputs import DeviceRope, PaddedDecode, make_step
from .staging import HostStaging

log = logging.getLogger("localserve.backends.cuda")


def default_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 16 up to 256 and every 64 past it, up to max_num_seqs; the
    backend passes min(max_num_seqs, batch_shape.MAX_GRAPH_BATCH)."""
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(320, 4097, 64))
    out = [s for s in sizes if s < max_num_seqs] + [max_num_seqs]
    return tuple(sorted(set(out)))


def cascade_graph_buckets(buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets that also get a shared-prefix (cascade) decode graph: every 64 rows from 64
    and the largest from 16. Each costs another capture and FlashInfer's workspaces, and a
    step pads up to the next one."""
    top = max(buckets)
    return tuple(b for b in buckets if (b >= 64 and b % 64 == 0) or (b == top and b >= 16))


class DecodeGraphs:
    def __init__(self, model: DecoderModel, attention, rope: DeviceRope,
                 kv: list[tuple[torch.Tensor, torch.Tensor]], buckets: tuple[int, ...],
                 block_size: int, max_blocks: int, scratch_block: int,
                 device: torch.device, staging: HostStaging | None = None,
                 cascade_buckets: tuple[int, ...] = ()) -> None:
        self.model = model
        self.attention = attention
        self.rope = rope
        self.kv = kv
        self.buckets = tuple(sorted(buckets))
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.device = device
        self.staging = staging
        top = self.buckets[-1]
        # rows: token ids, positions, slots; the graphs read fixed views of it
        self.inputs = torch.zeros((3, top), dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.inputs.unbind(0)
        self.rows = torch.arange(top, dtype=torch.long, device=device)
        # every graph writes its logits here (rows [:bs]): one [top, vocab] float32 buffer
        # instead of one per graph, which summed to ~4 GB for llama's buckets up to 512
        self.logits = torch.empty((top, model.cfg.vocab_size), dtype=torch.float32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, object, torch.Tensor]] = {}
        # shared-prefix (cascade) decode graphs, for the buckets in cascade_buckets
        self.cascade_graphs: dict[int, tuple[torch.cuda.CUDAGraph, object, torch.Tensor]] = {}
        self.cascade_buckets = tuple(sorted(b for b in cascade_buckets if b in self.buckets))
        self._current = None  # the entry `prepare` filled, which `replay` launches
        self.cascade_steps = 0  # decode steps prepared on a cascade graph (bench reports)
        self.pool = None
        # the largest first, so smaller graphs fit in the memory pool it leaves
        for bs in reversed(self.buckets):
            self._capture(bs, max_blocks)
            if bs in self.cascade_buckets:
                try:
                    self._capture(bs, max_blocks, cascade=True)
                except Exception as exc:  # FlashInfer's graph-mode prefill, merge_state's JIT
                    log.warning("cascade decode graph capture failed, shared-prefix decode "
                                "steps run eager: %r", exc)
                    self.cascade_buckets, self.cascade_graphs = (), {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _forward(self, bs: int, meta) -> torch.Tensor:
        step = make_step(self.model, self.rope, self.input_ids[:bs], self.positions[:bs], meta,
                         self.rows[:bs])
        return self.model.forward(step, self.kv, out=self.logits[:bs])

    def _capture(self, bs: int, max_blocks: int, cascade: bool = False) -> None:
        args = (bs, max_blocks, self.block_size, self.slot_mapping[:bs])
        # only FlashInfer captures cascade graphs (the backend asks for them with it alone)
        meta = (self.attention.graph_metadata(*args, cascade=True) if cascade
                else self.attention.graph_metadata(*args))
        self._fill(meta, PaddedDecode.dummy(bs, self.block_size, self.scratch_block), None)
        # warm up on a side stream (lazy inits, autotuning) before capturing
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bs, meta)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(bs, meta)
        if self.pool is None:
            self.pool = graph.pool()
        (self.cascade_graphs if cascade else self.graphs)[bs] = (graph, meta, logits)

    def _fill(self, meta, batch: PaddedDecode, staging: HostStaging | None,
              shared=None) -> None:
        n = batch.batch_size
        if staging is not None and staging.enabled:
            # the whole [3, top] block in one copy: rows past n are stale, and the graph of
            # bucket n reads none of them
            host, view = staging.empty(self.inputs.shape, torch.long)
            view[0, :n] = batch.input_ids
            view[1, :n] = batch.positions
            view[2, :n] = batch.slot_mapping
            self.inputs.copy_(host, non_blocking=True)
        else:
            self.input_ids[:n].copy_(torch.from_numpy(batch.input_ids), non_blocking=True)
            self.positions[:n].copy_(torch.from_numpy(batch.positions), non_blocking=True)
            self.slot_mapping[:n].copy_(torch.from_numpy(batch.slot_mapping), non_blocking=True)
        fill = self.attention.fill_graph_metadata
        if getattr(self.attention, "stages_inputs", False):  # FlashInfer (and its cascade)
            fill(meta, batch.seq_lens, batch.block_tables, staging, shared=shared)
        else:  # Triton: its own (pageable) copies
            fill(meta, batch.seq_lens, batch.block_tables)

    def bucket_for(self, num_seqs: int, buckets: tuple[int, ...] | None = None) -> int | None:
        for bs in self.buckets if buckets is None else buckets:
            if bs >= num_seqs:
                return bs
        return None

    def has_cascade(self, num_seqs: int, num_groups: int) -> bool:
        """Whether a cascade graph can run a decode step of num_seqs sequences in num_groups
        shared-prefix groups."""
        bs = self.bucket_for(num_seqs, self.cascade_buckets)
        return bs is not None and num_groups <= graph_max_groups(bs)

    def prepare(self, plan, shared=None) -> None:
        """Host half of a decode step: the padded inputs into the static buffers of the
        plan's bucket and its attention metadata (re-planned into fixed buffers); with
        `shared` (cascade.SharedPrefixes) the bucket's shared-prefix (cascade) graph."""
        if shared is None:
            bs = self.bucket_for(plan.num_seqs)
            entry = self.graphs[bs]
        else:
            bs = self.bucket_for(plan.num_seqs, self.cascade_buckets)
            entry = self.cascade_graphs[bs]
            self.cascade_steps += 1
        self._fill(entry[1], PaddedDecode.from_plan(plan, bs, self.scratch_block),
                   self.staging, shared)
        self._current = entry

    def replay(self, plan) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only plan whose inputs `prepare` filled (the graph
        prepare chose; replaying again re-runs the same inputs)."""
        graph, _, logits = self._current or self.graphs[self.bucket_for(plan.num_seqs)]
        graph.replay()
        return logits[: plan.num_seqs]

    def run(self, plan) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only plan with B <= max_batch sequences."""
        self.prepare(plan)
        return self.replay(plan)


# the retry after a failed capture: the buckets measured to capture (batch_shape.MAX_GRAPH_BATCH)
SAFE_MAX_BATCH = 512


def capture_or_none(model, attention, rope, kv, buckets, *args, **kwargs) -> DecodeGraphs | None:
    """DecodeGraphs, or None with a logged reason when capture fails (decode then runs eager).
    A failure with buckets past SAFE_MAX_BATCH (workspace or memory at the largest batches) is
    retried once with the buckets up to it; larger decode steps then run eager."""
    try:
        return DecodeGraphs(model, attention, rope, kv, buckets, *args, **kwargs)
    except Exception as exc:  # capture failures come from many layers (torch, FlashInfer, Triton)
        small = tuple(b for b in buckets if b <= SAFE_MAX_BATCH)
        if len(small) < len(tuple(buckets)) and small:
            log.warning("CUDA graph capture up to %d failed (%r); retrying up to %d",
                        max(buckets), exc, SAFE_MAX_BATCH)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return capture_or_none(model, attention, rope, kv, small, *args, **kwargs)
        log.warning("CUDA graph capture failed, decode runs without graphs: %r", exc)
        return None
