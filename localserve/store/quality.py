"""Quality of a converted model against its source: greedy continuations of a few built-in
prompts through the engine, compared token by token.

This is the one store module that runs the engine (through localserve.runtime); the
import-linter contract names it as the exception. The comparison itself is pure.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Sequence

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
)


@dataclass(slots=True)
class Agreement:
    prompts: int
    identical: int  # continuations equal token for token
    prefix_fraction: float  # mean share of tokens before the first difference

    def __str__(self) -> str:
        return (
            f"greedy agreement: {self.identical}/{self.prompts} continuations identical, "
            f"{100 * self.prefix_fraction:.0f}% of tokens before the first difference"
        )


def compare(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> Agreement:
    assert len(reference) == len(candidate)
    fractions, identical = [], 0
    for ref, cand in zip(reference, candidate):
        n = 0
        while n < min(len(ref), len(cand)) and ref[n] == cand[n]:
            n += 1
        identical += int(list(ref) == list(cand))
        fractions.append(n / max(len(ref), 1))
    return Agreement(len(reference), identical, sum(fractions) / max(len(fractions), 1))


def greedy_continuations(
    model_path: str, prompts: Sequence[str] = PROMPTS, max_tokens: int = 16, threads: int | None = None
) -> list[list[int]]:
    from localserve.engine.backend import BackendConfig
    from localserve.engine.llm_engine import EngineConfig
    from localserve.engine.sampling_params import SamplingParams
    from localserve.runtime.loader import load_model

    model = load_model(
        model_path,
        backend="cpu",
        backend_cfg=BackendConfig(num_threads=threads),
        engine_cfg=EngineConfig(num_blocks=64 * len(prompts), max_num_batched_tokens=512),
    )
    try:
        if model.tokenizer is None:
            raise ValueError(f"{model_path} has no tokenizer to encode the check prompts")
        ids = [model.tokenizer.encode(p) for p in prompts]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [seqs[0].output_token_ids for seqs in model.engine.generate(ids, params)]
    finally:
        close = getattr(model.engine.backend, "close", None)
        if close is not None:
            close()
        del model
        gc.collect()


def check_agreement(source: str, converted: str, max_tokens: int = 16, threads: int | None = None) -> Agreement:
    ref = greedy_continuations(source, max_tokens=max_tokens, threads=threads)
    cand = greedy_continuations(converted, max_tokens=max_tokens, threads=threads)
    return compare(ref, cand)
