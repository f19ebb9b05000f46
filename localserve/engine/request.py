"""Request: one sequence the engine generates (a request with n > 1 becomes n of these)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from localserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self is not _WAITING and self is not _RUNNING  # identity: asked per row per step


_WAITING = RequestStatus.WAITING
_RUNNING = RequestStatus.RUNNING


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    seq_id: int  # unique per sequence; what the Plan names
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    index: int = 0  # which of the n choices this sequence is
    # a fork waits until this sibling's prompt is cached, then shares its pages
    wait_for: Request | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # tokens whose K/V are in this request's pages
    num_computed_tokens: int = 0
    # prompt tokens served from the prefix cache at first admission (usage.cached_tokens)
    num_cached_tokens: int = -1
    block_table: list[int] = field(default_factory=list)
    cache_node: Any = None  # RadixCache node locked while this request reads its pages
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    # localserve.engine.grammar.GrammarState while the output is grammar-constrained
    grammar: Any = None

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_prefill(self) -> bool:
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def finished(self) -> bool:
        s = self.status
        return s is not _WAITING and s is not _RUNNING

    @property
    def finish_reason(self) -> str | None:
        s = self.status
        return None if s is _WAITING or s is _RUNNING else s.value
