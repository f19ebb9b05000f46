"""Engine deltas to OpenAI responses: whole completions and stream chunks, with logprobs and
usage (`prompt_tokens_details.cached_tokens` always present)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from localserve.engine.outputs import SeqDelta, TokenLogprob
from localserve.server.openai_protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)


class TokenText:
    """Token id -> its text for logprobs, memoized per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._memo.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)
            self._memo[token_id] = text
        return text

    def chat_logprobs(self, lps: Sequence[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatTokenLogprob(
                token=self(lp.token_id), logprob=lp.logprob, bytes=list(self(lp.token_id).encode()),
                top_logprobs=[TopLogprob(token=self(t), logprob=v, bytes=list(self(t).encode())) for t, v in lp.top],
            )
            for lp in lps
        ])

    def completion_logprobs(self, lps: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
        tokens, offsets = [], []
        for lp in lps:
            tokens.append(self(lp.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in lps],
            top_logprobs=[{self(t): v for t, v in lp.top} for lp in lps],
            text_offset=offsets,
        )


@dataclass(slots=True)
class ChoiceState:
    """One choice of a response as deltas arrive."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class UsageCounter:
    """Tokens per prompt (a prompt's n choices share it, and its cached tokens) and per choice."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)

    def add(self, prompt_index: int, choice_index: int, d: SeqDelta) -> None:
        self.prompt_tokens[prompt_index] = d.num_prompt_tokens
        if d.index == 0 or prompt_index not in self.cached_tokens:
            self.cached_tokens[prompt_index] = d.num_cached_tokens
        self.completion_tokens[choice_index] = d.num_output_tokens

    def usage(self) -> Usage:
        p = sum(self.prompt_tokens.values())
        c = sum(self.completion_tokens.values())
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())))


async def merge(streams: list[AsyncIterator[SeqDelta | None]],
                n: int) -> AsyncIterator[tuple[int, int, SeqDelta | None]]:
    """(prompt index, choice index, delta) from several prompts' streams as they come; choice
    index = prompt index * n + the delta's index. A None from a stream (sse.with_keepalive:
    nothing yet) passes through as (prompt index, its first choice, None). Leaving early
    closes every stream."""
    if len(streams) == 1:
        stream = streams[0]
        try:
            async for d in stream:
                yield 0, d.index if d is not None else 0, d
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[SeqDelta]) -> None:
        try:
            async for d in stream:
                await queue.put((i, i * n + (d.index if d is not None else 0), d))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)
        finally:
            await stream.aclose()
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            item = await queue.get()
            if item is done:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
