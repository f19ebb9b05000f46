"""A minimal hand-rolled scheduler for backend tests: builds `Plan`s straight from token lists.

Each sequence prefills its known tokens in chunks of `chunk` tokens, then decodes one
token per step, greedily. All live sequences share every step, so sequences of different
lengths give mixed prefill + decode plans. Pages come from a simple free list; a sequence
may start on pages another sequence filled (`prefix_blocks`), as a radix-cache hit would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from localserve.engine.plan import Plan, SamplingRow
from localserve.engine.sampling_params import SamplingParams


@dataclass
class DriverSeq:
    seq_id: int
    tokens: list[int]
    max_new: int
    chunk: int
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new


class PlanDriver:
    def __init__(self, backend, num_blocks: int, block_size: int) -> None:
        self.backend = backend
        self.block_size = block_size
        self.free = list(range(num_blocks - 1, -1, -1))
        self.next_id = 0
        self.steps = 0

    def add(self, prompt: list[int], max_new: int, chunk: int = 1 << 30,
            prefix_blocks: list[int] | None = None, prefix_len: int = 0) -> DriverSeq:
        """A sequence; with prefix_blocks, its first prefix_len tokens' KV is already cached there."""
        seq = DriverSeq(self.next_id, list(prompt), max_new, chunk)
        self.next_id += 1
        if prefix_blocks:
            assert prefix_len % self.block_size == 0 and prefix_len < len(prompt)
            seq.blocks = list(prefix_blocks[: prefix_len // self.block_size])
            seq.num_computed = prefix_len
        return seq

    def run(self, seqs: list[DriverSeq]) -> list[list[int]]:
        live = list(seqs)
        while live:
            self.step(live)
            live = [s for s in live if not s.done]
        return [s.output for s in seqs]

    def step(self, seqs: list[DriverSeq]) -> None:
        bs = self.block_size
        ids, pos, slots, qsl, lens, tables, sample_idx, rows = [], [], [], [0], [], [], [], []
        for b, s in enumerate(seqs):
            n = min(s.chunk, len(s.tokens) - s.num_computed)
            assert n > 0
            start, end = s.num_computed, s.num_computed + n
            while len(s.blocks) * bs < end:
                s.blocks.append(self.free.pop())
            p = np.arange(start, end)
            ids.extend(s.tokens[start:end])
            pos.extend(p.tolist())
            slots.extend((np.array(s.blocks)[p // bs] * bs + p % bs).tolist())
            qsl.append(qsl[-1] + n)
            lens.append(end)
            tables.append(s.blocks)
            if end == len(s.tokens):
                sample_idx.append(b)
                rows.append(SamplingRow(SamplingParams(temperature=0.0, max_tokens=s.max_new),
                                        seed=0, step=len(s.output)))
        width = max(len(t) for t in tables)
        plan = Plan(
            seq_ids=[s.seq_id for s in seqs],
            input_ids=np.array(ids, dtype=np.int64),
            positions=np.array(pos, dtype=np.int64),
            slot_mapping=np.array(slots, dtype=np.int64),
            query_start_loc=np.array(qsl, dtype=np.int32),
            seq_lens=np.array(lens, dtype=np.int32),
            block_tables=np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32),
            sample_idx=np.array(sample_idx, dtype=np.int32),
            sampling=rows,
            block_size=bs,
        )
        out = self.backend.execute(plan)
        assert out.token_ids.shape == (len(sample_idx),)
        for b, s in enumerate(seqs):
            s.num_computed = int(lens[b])
        for b, tok in zip(sample_idx, out.token_ids.tolist()):
            seqs[b].tokens.append(tok)
            seqs[b].output.append(tok)
        self.steps += 1
