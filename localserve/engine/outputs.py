"""What the engine reports per step for each sequence."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class SeqDelta:
    """New output of one choice (sequence) of a request since the last delta."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def coalesce(deltas: list[SeqDelta]) -> list[SeqDelta]:
    """Deltas of one request waiting for a consumer that fell behind, as fewer: each run of
    deltas of one choice becomes one (its tokens, text and logprobs joined; its finish and
    counts the last's), so a busy server sends bigger chunks rather than falling further behind."""
    out: list[SeqDelta] = []
    for d in deltas:
        prev = out[-1] if out else None
        if prev is None or prev.index != d.index or prev.finished:
            out.append(d)
            continue
        out[-1] = SeqDelta(
            request_id=d.request_id, index=d.index, token_ids=prev.token_ids + d.token_ids, text=prev.text + d.text,
            logprobs=(prev.logprobs or []) + (d.logprobs or []) if prev.logprobs or d.logprobs else None,
            finish_reason=d.finish_reason, stop_reason=d.stop_reason, num_prompt_tokens=d.num_prompt_tokens,
            num_cached_tokens=d.num_cached_tokens, num_output_tokens=d.num_output_tokens)
    return out


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot of the engine for metrics and status endpoints."""

    num_running: int
    num_waiting: int
    kv_pages_used: int  # held by running requests (not counting evictable cached pages)
    kv_pages_cached: int  # held only by the prefix cache; evictable
    kv_pages_total: int
    prefix_hit_tokens: int  # lifetime: prompt tokens served from the prefix cache
    prefix_query_tokens: int  # lifetime: prompt tokens looked up
    num_preemptions: int
