"""OpenAI Responses API schemas (msgspec): the request, the response object, its output items
and the stream events — the stateless subset (`store` is accepted, nothing is kept).

Input items and tools arrive as plain objects and are checked one by one in the adapter, which
names the item that is wrong instead of msgspec's union error. Unknown request fields are
ignored (`include`, `prompt_cache_key`, `service_tier`, `truncation`, ...).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# -- request -----------------------------------------------------------------------------------


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str = ""
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None  # accepted; a model that thinks shows it as a reasoning item
    store: bool | None = None  # accepted either way: this server keeps nothing
    previous_response_id: str | None = None  # refused: there is nothing to continue from
    conversation: str | dict[str, Any] | None = None  # refused, as previous_response_id
    background: bool = False  # refused when true
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None


# -- output items ------------------------------------------------------------------------------


class OutputText(msgspec.Struct, tag="output_text", tag_field="type", kw_only=True):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningText(msgspec.Struct, tag="reasoning_text", tag_field="type"):
    text: str


class MessageItem(msgspec.Struct, tag="message", tag_field="type", kw_only=True):
    id: str
    status: str  # in_progress | completed | incomplete
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class FunctionCallItem(msgspec.Struct, tag="function_call", tag_field="type", kw_only=True, omit_defaults=True):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str
    namespace: str | None = None  # set for a function of a namespace tool; `name` is then its own name


class ReasoningItem(msgspec.Struct, tag="reasoning", tag_field="type", kw_only=True):
    id: str
    status: str
    content: list[ReasoningText]
    summary: list[Any] = msgspec.field(default_factory=list)


OutputItem = MessageItem | FunctionCallItem | ReasoningItem


# -- the response object ------------------------------------------------------------------------


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class Usage(msgspec.Struct):
    """input_tokens is the whole prompt; cached_tokens of it came from the prefix cache."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(msgspec.Struct):
    reason: str  # max_output_tokens


class ResponseError(msgspec.Struct):
    code: str
    message: str


class Response(msgspec.Struct, kw_only=True):
    """The response object; the request's settings are echoed as OpenAI's API does."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: str  # in_progress | completed | incomplete | failed
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem]
    usage: Usage | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    max_output_tokens: int | None = None
    text: dict[str, Any]
    reasoning: dict[str, Any] | None = None
    previous_response_id: None = None
    store: bool = False  # nothing is ever stored, whatever the request asked
    background: bool = False
    truncation: str = "disabled"
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    user: str | None = None


# -- stream events ------------------------------------------------------------------------------
# Every event carries sequence_number; the route numbers them as it sends them.


class _Event(msgspec.Struct, kw_only=True):
    sequence_number: int = 0


class Created(_Event, tag="response.created", tag_field="type"):
    response: Response


class InProgress(_Event, tag="response.in_progress", tag_field="type"):
    response: Response


class Completed(_Event, tag="response.completed", tag_field="type"):
    response: Response


class Incomplete(_Event, tag="response.incomplete", tag_field="type"):
    response: Response


class Failed(_Event, tag="response.failed", tag_field="type"):
    response: Response


class ItemAdded(_Event, tag="response.output_item.added", tag_field="type"):
    output_index: int
    item: OutputItem


class ItemDone(_Event, tag="response.output_item.done", tag_field="type"):
    output_index: int
    item: OutputItem


class PartAdded(_Event, tag="response.content_part.added", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class PartDone(_Event, tag="response.content_part.done", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class TextDeltaEvent(_Event, tag="response.output_text.delta", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class TextDoneEvent(_Event, tag="response.output_text.done", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningDeltaEvent(_Event, tag="response.reasoning_text.delta", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningDoneEvent(_Event, tag="response.reasoning_text.done", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    text: str


class ArgsDeltaEvent(_Event, tag="response.function_call_arguments.delta", tag_field="type"):
    item_id: str
    output_index: int
    delta: str


class ArgsDoneEvent(_Event, tag="response.function_call_arguments.done", tag_field="type"):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event, tag="error", tag_field="type"):
    code: str | None
    message: str
    param: str | None = None


StreamEvent = (Created | InProgress | Completed | Incomplete | Failed | ItemAdded | ItemDone | PartAdded | PartDone
               | TextDeltaEvent | TextDoneEvent | ReasoningDeltaEvent | ReasoningDoneEvent | ArgsDeltaEvent
               | ArgsDoneEvent | ErrorEvent)
