"""Raw timings of one measured call, and the runner seam both engines implement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class StreamTiming:
    """One request: when it was submitted and when each of its tokens came out (perf_counter s)."""

    start: float
    token_times: list[float]
    num_prompt_tokens: int
    num_cached_tokens: int | None = None  # None: the engine does not say

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def decode_rate(self) -> float:
        """(tokens - 1) / (last token time - first token time): prefill excluded (PEERS.md method)."""
        n = len(self.token_times)
        if n < 2:
            raise ValueError("a decode rate needs at least two tokens")
        return (n - 1) / (self.token_times[-1] - self.token_times[0])


@dataclass(slots=True)
class BatchTiming:
    """N requests served together (or back to back): total completion tokens over wall time."""

    wall: float
    num_tokens: int
    num_requests: int
    per_request_tokens: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.num_tokens / self.wall


class Runner(Protocol):
    name: str
    # how `batch` serves N requests, said in the output ("continuous batching", "sequential")
    batch_mode: str

    def stream(self, prompt: list[int], max_tokens: int) -> StreamTiming: ...

    def batch(self, prompts: list[list[int]], max_tokens: int) -> BatchTiming: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...
