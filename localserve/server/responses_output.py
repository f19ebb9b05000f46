"""One answer's output text as Responses API output items: stream events as the text arrives
(OutputItems), or the items of a whole answer (items_of).

The output parser (tools package) decides what is text, reasoning or a function call; this
module lays that out as items: reasoning, message (one output_text part) and function_call.
A whole answer reads as OpenAI's chat completions do: a call cut off by max_output_tokens is
dropped, and if no call completed the whole text is the message. A stream cannot take back
what it sent: a call that broke off stays, with status incomplete.
"""

from __future__ import annotations

import uuid
from typing import AbstractSet

import msgspec

from localserve.server.responses_adapter import split_name
from localserve.server.responses_protocol import (
    ArgsDeltaEvent,
    ArgsDoneEvent,
    FunctionCallItem,
    ItemAdded,
    ItemDone,
    MessageItem,
    OutputItem,
    OutputText,
    PartAdded,
    PartDone,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    ReasoningItem,
    ReasoningText,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from localserve.server.tools import ArgsDelta, CallStart, OutputParser, ReasoningDelta
from localserve.server.tools.output import ParsedOutput
from localserve.server.tools import TextDelta as ContentDelta


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def call_item(call_id: str, qualified: str, arguments: str, status: str,
              namespaces: AbstractSet[str]) -> FunctionCallItem:
    """A function_call item; a namespace tool's function is named as the client defined it,
    with its namespace beside it."""
    namespace, name = split_name(qualified, namespaces)
    return FunctionCallItem(id=item_id("fc"), call_id=call_id, name=name, namespace=namespace, arguments=arguments,
                            status=status)


def items_of(parsed: ParsedOutput, truncated: bool, namespaces: AbstractSet[str] = frozenset()) -> list[OutputItem]:
    """truncated: the answer stopped at max_output_tokens, so its message is incomplete;
    namespaces: the request's namespace tools."""
    items: list[OutputItem] = []
    if parsed.reasoning:
        items.append(ReasoningItem(id=item_id("rs"), status="incomplete" if truncated and parsed.content is None
                                   and not parsed.calls else "completed", content=[ReasoningText(parsed.reasoning)]))
    if parsed.content:
        items.append(MessageItem(id=item_id("msg"), status="incomplete" if truncated else "completed",
                                 content=[OutputText(text=parsed.content)]))
    items += [call_item(c.id, c.name, c.arguments, "completed", namespaces) for c in parsed.calls]
    return items


class OutputItems:
    """Items in output order, one open (receiving deltas) at a time."""

    def __init__(self, parser: OutputParser, namespaces: AbstractSet[str] = frozenset()) -> None:
        self.parser = parser
        self.namespaces = namespaces
        self.items: list[OutputItem] = []
        self._open = False

    @property
    def reasoning(self) -> str:
        return "".join(p.text for it in self.items if isinstance(it, ReasoningItem) for p in it.content)

    def feed(self, text: str) -> list[StreamEvent]:
        return self._apply(self.parser.feed(text)) if text else []

    def finish(self, truncated: bool) -> list[StreamEvent]:
        """truncated: the answer stopped at max_output_tokens, so its last item is incomplete."""
        return self._apply(self.parser.finish()) + self._close("incomplete" if truncated else "completed")

    def _apply(self, events) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for ev in events:
            if isinstance(ev, ReasoningDelta):
                if ev.text:
                    if not self._is_open(ReasoningItem):
                        out += self._start(ReasoningItem(id=item_id("rs"), status="in_progress", content=[]),
                                           ReasoningText(""))
                    self.items[-1].content[0].text += ev.text
                    out.append(ReasoningDeltaEvent(**self._where(), content_index=0, delta=ev.text))
            elif isinstance(ev, ContentDelta):
                if ev.text:
                    if not self._is_open(MessageItem):
                        out += self._start(MessageItem(id=item_id("msg"), status="in_progress", content=[]),
                                           OutputText(text=""))
                    self.items[-1].content[0].text += ev.text
                    out.append(TextDeltaEvent(**self._where(), content_index=0, delta=ev.text))
            elif isinstance(ev, CallStart):
                out += self._start(call_item(ev.id, ev.name, "", "in_progress", self.namespaces), None)
            elif isinstance(ev, ArgsDelta) and ev.text:
                assert self._is_open(FunctionCallItem), "arguments arrive for the open call only"
                self.items[-1].arguments += ev.text
                out.append(ArgsDeltaEvent(**self._where(), delta=ev.text))
        return out

    def _where(self) -> dict:
        return {"item_id": self.items[-1].id, "output_index": len(self.items) - 1}

    def _is_open(self, kind: type) -> bool:
        return self._open and isinstance(self.items[-1], kind)

    def _start(self, item: OutputItem, part: OutputText | ReasoningText | None) -> list[StreamEvent]:
        """`item` fills as deltas arrive; the start events carry it empty (they are encoded
        after later deltas of the same batch have filled it)."""
        out = self._close("completed")
        self.items.append(item)
        self._open = True
        index = len(self.items) - 1
        if part is None:
            out.append(ItemAdded(output_index=index, item=_copy(item)))
            return out
        item.content.append(part)
        out.append(ItemAdded(output_index=index, item=_copy(item, content=[])))
        out.append(PartAdded(item_id=item.id, output_index=index, content_index=0, part=_copy(part)))
        return out

    def _close(self, status: str) -> list[StreamEvent]:
        if not self._open:
            return []
        self._open = False
        item, where, out = self.items[-1], self._where(), []
        if isinstance(item, FunctionCallItem):
            # a call the parser did not complete (cut off, or broken JSON) is incomplete
            done = any(c.id == item.call_id for c in self.parser.calls)
            item.status = "completed" if done and status == "completed" else "incomplete"
            out.append(ArgsDoneEvent(**where, name=item.name, arguments=item.arguments))
        else:
            item.status = status
            part = item.content[0]
            if isinstance(part, OutputText):
                out.append(TextDoneEvent(**where, content_index=0, text=part.text))
            else:
                out.append(ReasoningDoneEvent(**where, content_index=0, text=part.text))
            out.append(PartDone(**where, content_index=0, part=_copy(part)))
        out.append(ItemDone(output_index=where["output_index"], item=_copy(item)))
        return out


def _copy(struct, **changes):
    return msgspec.structs.replace(struct, **changes) if changes else msgspec.structs.replace(struct)
