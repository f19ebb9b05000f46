"""OutputParser: one choice's output text -> reasoning, content and tool calls, streamed
(feed/finish -> events) or whole (parse). The reasoning split runs first; what it leaves as
content goes through the tool-call parser."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from localserve.server.reasoning import ReasoningParser
from localserve.server.tools.parser import Event, TextDelta, ToolCallParser
from localserve.server.tools.spec import ToolCall


@dataclass(slots=True)
class ReasoningDelta:
    text: str


@dataclass(slots=True)
class ParsedOutput:
    reasoning: str | None  # None: the model did not think (or does not use think tags)
    content: str | None  # None when the answer is only tool calls
    calls: list[ToolCall] = field(default_factory=list)


class OutputParser:
    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolCallParser | None = None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    @classmethod
    def for_request(cls, plan: Any, tokenizer: Any, prompt_text: str) -> OutputParser:
        """plan: a ToolPlan (or None); prompt_text: the rendered prompt."""
        tools = plan.parser() if plan is not None else None
        if tools is not None and plan.guided is not None:
            tools.forced = True  # the plan's grammar forces the calls
        return cls(ReasoningParser.for_prompt(tokenizer, prompt_text), tools)

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools is not None else []

    def feed(self, text: str) -> list[Event | ReasoningDelta]:
        if self.reasoning is None:
            return self._content(text)
        thought, content = self.reasoning.feed(text)
        return self._events(thought, content)

    def finish(self) -> list[Event | ReasoningDelta]:
        out: list[Event | ReasoningDelta] = []
        if self.reasoning is not None:
            out = self._events(*self.reasoning.finish())
        if self.tools is not None:
            out += self.tools.finish()
        return out

    def parse(self, text: str) -> ParsedOutput:
        """The whole output of a choice (a fresh parser per output)."""
        thought: str | None = None
        if self.reasoning is not None:
            r1, c1 = self.reasoning.feed(text)
            r2, c2 = self.reasoning.finish()
            thought, text = (r1 + r2 if self.reasoning.thought else None), c1 + c2
        if self.tools is None:
            return ParsedOutput(thought, text)
        content, calls = self.tools.parse(text)
        return ParsedOutput(thought, content if content or not (calls or self.tools.forced) else None, calls)

    def _events(self, thought: str, content: str) -> list[Event | ReasoningDelta]:
        out: list[Event | ReasoningDelta] = [ReasoningDelta(thought)] if thought else []
        return out + self._content(content) if content else out

    def _content(self, text: str) -> list[Event | ReasoningDelta]:
        if self.tools is None:
            return [TextDelta(text)] if text else []
        return list(self.tools.feed(text))
