"""A tiny deterministic backend for engine-core tests.

It keeps a real paged "KV cache": each token's entry (token id, position) is written at its
slot_mapping slot, and the next token is a hash of every entry read back through the
sequence's block table. So a wrong block table, slot mapping, prefix-cache hit or recompute
gives different tokens than `reference_generate`, which computes the same function from
the plain token list.
"""

from __future__ import annotations

import numpy as np

from localserve.engine.backend import BackendConfig, Buckets, DeviceInfo
from localserve.engine.plan import ForwardOutput, Plan, SamplingRow

MASK = (1 << 61) - 1


def _mix(x: int) -> int:
    x = (x ^ (x >> 31)) * 0x7FB5D329728EA185 & 0xFFFFFFFFFFFFFFFF
    x = (x ^ (x >> 27)) * 0x81DADEF4BC2DD44D & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 33)


def seq_hash(tokens) -> int:
    h = 1469598103934665603
    for t in tokens:
        h = _mix(h ^ (int(t) + 0x9E3779B97F4A7C15)) & MASK
    return h


def next_token(tokens, row: SamplingRow, vocab: int) -> int:
    h = seq_hash(tokens)
    if not row.params.greedy:
        h = _mix(h ^ _mix(row.seed * 1000003 + row.step))
    return int(h % vocab)


class ToyBackend:
    name = "toy"

    def __init__(self, vocab_size: int = 50, num_blocks: int = 64) -> None:
        self.vocab_size = vocab_size
        self._capacity = num_blocks
        self.kv_tok: np.ndarray | None = None
        self.kv_pos: np.ndarray | None = None
        self.steps = 0

    @classmethod
    def probe(cls) -> list[DeviceInfo]:
        return [DeviceInfo("toy", "toy", 1 << 20)]

    def load(self, model, cfg: BackendConfig) -> None:
        pass

    def kv_capacity(self, block_size: int) -> int:
        return self._capacity

    def init_kv(self, num_blocks: int, block_size: int) -> None:
        self.kv_tok = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.kv_pos = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.block_size = block_size

    def shape_buckets(self) -> Buckets:
        return Buckets()

    def execute(self, plan: Plan) -> ForwardOutput:
        self.steps += 1
        assert len(set(plan.slot_mapping.tolist())) == plan.num_tokens, "two tokens share a slot"
        self.kv_tok[plan.slot_mapping] = plan.input_ids
        self.kv_pos[plan.slot_mapping] = plan.positions
        bs = plan.block_size
        out = []
        for s, b in enumerate(plan.sample_idx.tolist()):
            n = int(plan.seq_lens[b])
            pos = np.arange(n)
            slots = plan.block_tables[b][pos // bs].astype(np.int64) * bs + pos % bs
            assert (self.kv_pos[slots] == pos).all(), "KV read through the block table is stale"
            out.append(next_token(self.kv_tok[slots], plan.sampling[s], self.vocab_size))
        return ForwardOutput(token_ids=np.asarray(out, dtype=np.int64))

    def close(self) -> None:
        pass


def reference_generate(prompt, row_params, seed: int, vocab: int, eos: set[int], max_context: int) -> list[int]:
    """What the engine must produce for one sequence, computed without pages or batching."""
    tokens = list(prompt)
    out: list[int] = []
    while True:
        tok = next_token(tokens, SamplingRow(row_params, seed, len(out)), vocab)
        out.append(tok)
        tokens.append(tok)
        if (not row_params.ignore_eos and tok in eos) or tok in row_params.stop_token_ids:
            return out
        if row_params.max_tokens is not None and len(out) >= row_params.max_tokens:
            return out
        if len(tokens) >= max_context:
            return out
