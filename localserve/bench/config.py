"""What a bench run measures and how."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# --only takes these names; each group yields one or more figures
FIGURE_GROUPS = ("decode", "prefill", "concurrent", "prefix", "ttft")


@dataclass(slots=True)
class BenchConfig:
    model: str | None = None  # None: the embedded default GGUF
    backend: str = "auto"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    only: tuple[str, ...] = FIGURE_GROUPS
    peer: bool = True  # also measure llama.cpp on the same GGUF
    peer_ctx: int = 8192
    decode_tokens: int = 128
    prefill_tokens: int = 512
    concurrency: tuple[int, ...] = (4, 16)
    concurrent_tokens: int = 64
    prefix_tokens: int = 2000
    # before each measured run, wait up to this many seconds for other processes to go quiet
    quiet_wait: float = 0.0
    # measure a run again (with fresh prompts) up to this many times when others used >10% of the CPU
    retry_noisy: int = 0
    # localserve engine sizing; None keeps the EngineConfig default
    max_num_seqs: int | None = None
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.only) - set(FIGURE_GROUPS)
        if unknown:
            raise ValueError(f"unknown figure(s) {sorted(unknown)}; known: {', '.join(FIGURE_GROUPS)}")
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")
        if self.decode_tokens < 2:
            raise ValueError("decode_tokens must be at least 2 (the rate needs two token times)")
        for name in ("threads", "prefill_tokens", "concurrent_tokens", "prefix_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be positive")
