"""SamplingParams: what a request asks of the sampler and the stop logic."""

from __future__ import annotations

from dataclasses import dataclass, field

from localserve.engine.guided import GuidedDecoding
from localserve.errors import InvalidRequestError

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below it are greedy


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: until EOS or the context is full
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 => off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM semantics: over prompt and output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # structured output (JSON schema, JSON object, regex, EBNF or choice); None = free text
    guided: GuidedDecoding | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            bad(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= 20:
            bad(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.n < 1 or self.n > 128:
            bad(f"n must be in [1, 128], got {self.n}")
        for tok, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                bad(f"logit_bias for token {tok} must be in [-100, 100], got {bias}")
        if self.guided is not None:
            if not isinstance(self.guided, GuidedDecoding):
                bad(f"guided must be a GuidedDecoding, got {type(self.guided).__name__}")
            self.guided.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def argmax_only(self) -> bool:
        """Greedy with nothing that changes the logits and no logprobs: without a grammar
        mask the sampled id is the argmax of the raw logits."""
        return (self.temperature < GREEDY_EPS and not self.logprobs and not self.logit_bias
                and not self.needs_penalties)

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def num_top_logprobs(self) -> int:
        return self.top_logprobs if self.logprobs else 0
