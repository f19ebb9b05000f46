"""A toy language model for grammar tests: the paged toy backend's KV bookkeeping, with
pseudo-random logits per (sequence, step) sampled by the real torch sampler, so the grammar
bitmask in the Plan is applied the way the CPU backend applies it."""

from __future__ import annotations

import numpy as np
import torch

from localserve.backends.torch_common.sampling import sample
from localserve.engine.llm_engine import EngineConfig, LLMEngine
from localserve.engine.plan import ForwardOutput, Plan
from localserve.models.config import ModelConfig
from tests.engine.toy_backend import ToyBackend, seq_hash


class LogitsToyBackend(ToyBackend):
    """next-token logits = a standard normal draw seeded by the hash of the sequence so far."""

    def __init__(self, vocab_size: int, num_blocks: int = 512, scale: float = 3.0) -> None:
        super().__init__(vocab_size, num_blocks)
        self.scale = scale
        self.plans: list[Plan] = []

    def execute(self, plan: Plan) -> ForwardOutput:
        self.steps += 1
        self.plans.append(plan)
        self.kv_tok[plan.slot_mapping] = plan.input_ids
        self.kv_pos[plan.slot_mapping] = plan.positions
        bs = plan.block_size
        rows = []
        for b in plan.sample_idx.tolist():
            n = int(plan.seq_lens[b])
            pos = np.arange(n)
            slots = plan.block_tables[b][pos // bs].astype(np.int64) * bs + pos % bs
            assert (self.kv_pos[slots] == pos).all(), "KV read through the block table is stale"
            rng = np.random.default_rng(seq_hash(self.kv_tok[slots]))
            rows.append(rng.standard_normal(self.vocab_size, dtype=np.float32) * self.scale)
        logits = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, self.vocab_size)
        return sample(logits, plan.sampling)


def toy_engine(tokenizer, vocab_size: int | None = None, **kw) -> LLMEngine:
    vocab = vocab_size or tokenizer.vocab_size
    cfg = ModelConfig(
        architecture="llama", vocab_size=vocab, hidden_size=8, intermediate_size=16, num_layers=1,
        num_heads=1, num_kv_heads=1, head_dim=8, max_context=1024, rms_norm_eps=1e-6,
        rope_theta=1e4, eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
    )
    backend = LogitsToyBackend(vocab, kw.pop("num_blocks", 512))
    return LLMEngine(backend, cfg, tokenizer, EngineConfig(block_size=8, **kw))
