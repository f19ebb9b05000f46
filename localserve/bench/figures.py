"""The measured figures. A probe builds one repeat's inputs once (the same token ids for
every engine), then runs them on each engine and returns one sample per figure it feeds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Protocol

from localserve.bench.config import BenchConfig
from localserve.bench.prompts import PromptFactory
from localserve.bench.timing import Runner


@dataclass(slots=True)
class Figure:
    key: str
    label: str
    unit: str  # "tok/s" or "ms"
    higher_is_better: bool
    samples: dict[str, list[float]] = field(default_factory=dict)  # engine -> one value per repeat
    details: dict[str, list[dict]] = field(default_factory=dict)  # engine -> raw facts per repeat
    notes: dict[str, str] = field(default_factory=dict)  # engine -> how it was served
    # mean share of the machine's CPU other processes used during the measured runs (0 = quiet)
    foreign_cpu: float | None = None

    def median(self, engine: str) -> float | None:
        values = self.samples.get(engine)
        return statistics.median(values) if values else None

    def add(self, engine: str, value: float, detail: dict) -> None:
        self.samples.setdefault(engine, []).append(value)
        self.details.setdefault(engine, []).append(detail)


@dataclass(slots=True)
class Sample:
    value: float
    detail: dict


class Probe(Protocol):
    def figures(self) -> list[Figure]: ...

    def inputs(self, prompts: PromptFactory) -> Any: ...

    def run(self, runner: Runner, inputs: Any) -> dict[str, Sample]: ...


class DecodeProbe:
    def __init__(self, num_tokens: int):
        self.num_tokens = num_tokens

    def figures(self) -> list[Figure]:
        return [Figure("decode", f"decode tok/s, 1 stream ({self.num_tokens} tok greedy)", "tok/s", True)]

    def inputs(self, prompts: PromptFactory) -> list[int]:
        return prompts.decode_prompt()

    def run(self, runner: Runner, prompt: list[int]) -> dict[str, Sample]:
        t = runner.stream(prompt, self.num_tokens)
        return {"decode": Sample(t.decode_rate, {"tokens": len(t.token_times), "ttft_s": t.ttft,
                                                 "span_s": t.token_times[-1] - t.token_times[0]})}


class PrefillProbe:
    def __init__(self, num_tokens: int):
        self.num_tokens = num_tokens

    def figures(self) -> list[Figure]:
        return [Figure("prefill", f"prefill tok/s ({self.num_tokens}-tok prompt, uncached)", "tok/s", True)]

    def inputs(self, prompts: PromptFactory) -> list[int]:
        return prompts.fresh_exact(self.num_tokens)

    def run(self, runner: Runner, prompt: list[int]) -> dict[str, Sample]:
        t = runner.stream(prompt, 1)
        return {"prefill": Sample(len(prompt) / t.ttft, {"prompt_tokens": len(prompt), "ttft_s": t.ttft,
                                                         "cached_tokens": t.num_cached_tokens})}


class ConcurrentProbe:
    def __init__(self, num_requests: int, num_tokens: int):
        self.num_requests = num_requests
        self.num_tokens = num_tokens
        self.key = f"concurrent_{num_requests}"

    def figures(self) -> list[Figure]:
        return [Figure(self.key, f"aggregate tok/s, {self.num_requests} concurrent x {self.num_tokens} tok",
                       "tok/s", True)]

    def inputs(self, prompts: PromptFactory) -> list[list[int]]:
        return prompts.fresh_questions(self.num_requests)

    def run(self, runner: Runner, batch: list[list[int]]) -> dict[str, Sample]:
        t = runner.batch(batch, self.num_tokens)
        return {self.key: Sample(t.rate, {"wall_s": t.wall, "tokens": t.num_tokens, "requests": t.num_requests,
                                          "mode": runner.batch_mode})}


class PrefixProbe:
    """A ~2k-token system prompt: cold (fresh first line) then hit (same text, another question)."""

    def __init__(self, num_tokens: int):
        self.num_tokens = num_tokens
        self._system: list[int] | None = None

    def figures(self) -> list[Figure]:
        n = self.num_tokens
        return [
            Figure("prefix_cold", f"TTFT ms, {n}-tok system prompt, cold", "ms", False),
            Figure("prefix_hit", f"TTFT ms, {n}-tok system prompt, prefix hit", "ms", False),
        ]

    def inputs(self, prompts: PromptFactory) -> tuple[list[int], list[int]]:
        if self._system is None:
            self._system = prompts.system_prompt(self.num_tokens)
        head = prompts.bos() + prompts.header()  # BOS + a never-seen first line
        return head + self._system + prompts.question(1), head + self._system + prompts.question(2)

    def run(self, runner: Runner, pair: tuple[list[int], list[int]]) -> dict[str, Sample]:
        cold_prompt, hit_prompt = pair
        cold = runner.stream(cold_prompt, 1)
        hit = runner.stream(hit_prompt, 1)
        return {
            "prefix_cold": Sample(cold.ttft * 1e3, {"prompt_tokens": len(cold_prompt),
                                                    "cached_tokens": cold.num_cached_tokens}),
            "prefix_hit": Sample(hit.ttft * 1e3, {"prompt_tokens": len(hit_prompt),
                                                  "cached_tokens": hit.num_cached_tokens}),
        }


class ShortTTFTProbe:
    def figures(self) -> list[Figure]:
        return [Figure("ttft_short", "TTFT ms, short prompt (uncached)", "ms", False)]

    def inputs(self, prompts: PromptFactory) -> list[int]:
        return prompts.fresh_short()

    def run(self, runner: Runner, prompt: list[int]) -> dict[str, Sample]:
        t = runner.stream(prompt, 1)
        return {"ttft_short": Sample(t.ttft * 1e3, {"prompt_tokens": len(prompt),
                                                    "cached_tokens": t.num_cached_tokens})}


def build_probes(cfg: BenchConfig) -> list[Probe]:
    probes: list[Probe] = []
    if "decode" in cfg.only:
        probes.append(DecodeProbe(cfg.decode_tokens))
    if "prefill" in cfg.only:
        probes.append(PrefillProbe(cfg.prefill_tokens))
    if "concurrent" in cfg.only:
        probes += [ConcurrentProbe(n, cfg.concurrent_tokens) for n in cfg.concurrency]
    if "prefix" in cfg.only:
        probes.append(PrefixProbe(cfg.prefix_tokens))
    if "ttft" in cfg.only:
        probes.append(ShortTTFTProbe())
    return probes
