"""One answer's output text as Anthropic content blocks: stream events as the text arrives, and
the finished list of blocks.

A non-streamed answer goes through the same assembler with its events dropped, so the two
cannot disagree. The output parser (tools package) decides what is text, thinking or a tool
call; this module only lays its events out as blocks.
"""

from __future__ import annotations

import json

from localserve.server.anthropic_protocol import (
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    InputJsonDelta,
    OutputBlock,
    OutputText,
    OutputThinking,
    OutputToolUse,
    SignatureDelta,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
)
from localserve.server.tools import ArgsDelta, CallStart, OutputParser, ReasoningDelta
from localserve.server.tools import TextDelta as ContentDelta


def tool_use_id(call_id: str) -> str:
    """Anthropic spells call ids toolu_...; the parser's call_<hex> keeps its hex."""
    return "toolu_" + call_id.removeprefix("call_")


class AnswerBlocks:
    """Blocks in output order; one block is open (receiving deltas) at a time."""

    def __init__(self, parser: OutputParser, show_thinking: bool) -> None:
        self.parser = parser
        self.show_thinking = show_thinking  # the request enabled thinking; otherwise reasoning is dropped
        self.blocks: list[OutputBlock] = []
        self._open = False
        self._args: list[str] = []  # the open tool_use block's arguments JSON, in pieces
        self._call_blocks: dict[int, int] = {}  # the parser's call index -> block index

    @property
    def called_tools(self) -> bool:
        return any(isinstance(b, OutputToolUse) for b in self.blocks)

    def feed(self, text: str) -> list[StreamEvent]:
        return self._apply(self.parser.feed(text)) if text else []

    def finish(self) -> list[StreamEvent]:
        return self._apply(self.parser.finish()) + self._close()

    def _apply(self, events) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for ev in events:
            if isinstance(ev, ReasoningDelta):
                if self.show_thinking and ev.text:
                    if not self._is_open(OutputThinking):
                        out += self._start(OutputThinking(thinking=""))
                    self.blocks[-1].thinking += ev.text
                    out.append(ContentBlockDelta(index=len(self.blocks) - 1, delta=ThinkingDelta(ev.text)))
            elif isinstance(ev, ContentDelta):
                if ev.text:
                    if not self._is_open(OutputText):
                        out += self._start(OutputText(text=""))
                    self.blocks[-1].text += ev.text
                    out.append(ContentBlockDelta(index=len(self.blocks) - 1, delta=TextDelta(ev.text)))
            elif isinstance(ev, CallStart):
                out += self._start(OutputToolUse(id=tool_use_id(ev.id), name=ev.name, input={}))
                self._call_blocks[ev.index] = len(self.blocks) - 1
            elif isinstance(ev, ArgsDelta) and ev.text:
                index = self._call_blocks[ev.index]
                assert index == len(self.blocks) - 1 and self._open, "arguments arrive for the open call only"
                self._args.append(ev.text)
                out.append(ContentBlockDelta(index=index, delta=InputJsonDelta(ev.text)))
        return out

    def _is_open(self, kind: type) -> bool:
        return self._open and isinstance(self.blocks[-1], kind)

    def _start(self, block: OutputBlock) -> list[StreamEvent]:
        out = self._close()
        self.blocks.append(block)
        self._open = True
        # the start event carries the block empty; `block` itself fills as deltas arrive
        empty = {OutputText: lambda: OutputText(text=""), OutputThinking: lambda: OutputThinking(thinking=""),
                 OutputToolUse: lambda: OutputToolUse(id=block.id, name=block.name, input={})}
        out.append(ContentBlockStart(index=len(self.blocks) - 1, content_block=empty[type(block)]()))
        return out

    def _close(self) -> list[StreamEvent]:
        if not self._open:
            return []
        self._open = False
        block, index, out = self.blocks[-1], len(self.blocks) - 1, []
        if isinstance(block, OutputToolUse):
            block.input = _arguments("".join(self._args))
            self._args = []
        elif isinstance(block, OutputThinking):
            out.append(ContentBlockDelta(index=index, delta=SignatureDelta(signature=block.signature)))
        out.append(ContentBlockStop(index=index))
        return out


def _arguments(text: str) -> dict:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
