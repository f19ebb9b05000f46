"""Anthropic Messages API schemas (msgspec): requests, responses, stream events, errors.

Unknown fields are ignored (`metadata`, `service_tier`, `thinking`, `cache_control`, ... are
accepted and have no effect); a known field with the wrong type is a 400. Content blocks arrive
as plain objects and are checked block by block in the adapter, which names the block that is
wrong instead of msgspec's union error.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# -- requests ----------------------------------------------------------------------------------


class InputMessage(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]]


class TextBlock(msgspec.Struct, kw_only=True):
    text: str
    type: Literal["text"] = "text"


class ToolUseBlock(msgspec.Struct, kw_only=True):
    id: str
    name: str
    input: dict[str, Any]
    type: Literal["tool_use"] = "tool_use"


class ToolResultBlock(msgspec.Struct, kw_only=True):
    tool_use_id: str
    content: str | list[dict[str, Any]] | None = None
    is_error: bool = False
    type: Literal["tool_result"] = "tool_result"


class Tool(msgspec.Struct, kw_only=True):
    name: str
    input_schema: dict[str, Any] | None = None  # required for client tools; server tools have none
    description: str | None = None
    type: str | None = None  # "custom" or absent; server tools (web_search_..., ...) are left out
    defer_loading: bool = False  # advanced tool use: refused (no server-side tool search)


class ToolChoice(msgspec.Struct, kw_only=True):
    type: str  # auto | any | tool | none
    name: str | None = None
    disable_parallel_tool_use: bool = False


class PromptFields(msgspec.Struct, kw_only=True):
    """What decides the prompt: shared by /v1/messages and /v1/messages/count_tokens, so both
    build the same token ids."""

    model: str
    messages: list[InputMessage]
    system: str | list[dict[str, Any]] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None  # accepted; this server does not think out loud


class MessagesRequest(PromptFields, kw_only=True):
    max_tokens: int  # required, as in Anthropic's API
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None
    stream: bool = False
    output_config: dict[str, Any] | None = None  # format: json_schema is honoured; effort is not


class CountTokensRequest(PromptFields, kw_only=True):
    pass


# -- responses ---------------------------------------------------------------------------------


class Usage(msgspec.Struct):
    """input_tokens excludes the prompt tokens read from the prefix cache, as in Anthropic's API:
    the whole prompt is input_tokens + cache_read_input_tokens + cache_creation_input_tokens."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class OutputText(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class OutputToolUse(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]


class OutputThinking(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str
    signature: str = ""  # nothing to sign: a thinking block sent back is skipped


OutputBlock = OutputText | OutputToolUse | OutputThinking


class Message(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutputBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage


class CountTokensResponse(msgspec.Struct):
    input_tokens: int


class ErrorDetail(msgspec.Struct):
    type: str
    message: str


class ErrorResponse(msgspec.Struct, kw_only=True):
    type: Literal["error"] = "error"
    error: ErrorDetail


# -- stream events -----------------------------------------------------------------------------


class MessageStart(msgspec.Struct, tag="message_start", tag_field="type"):
    message: Message


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    pass


class ContentBlockStart(msgspec.Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: OutputBlock


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type"):
    text: str


class InputJsonDelta(msgspec.Struct, tag="input_json_delta", tag_field="type"):
    partial_json: str


class ThinkingDelta(msgspec.Struct, tag="thinking_delta", tag_field="type"):
    thinking: str


class SignatureDelta(msgspec.Struct, tag="signature_delta", tag_field="type"):
    signature: str


class ContentBlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: TextDelta | InputJsonDelta | ThinkingDelta | SignatureDelta


class ContentBlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type"):
    index: int


class MessageDeltaBody(msgspec.Struct):
    stop_reason: str | None
    stop_sequence: str | None


class MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type"):
    delta: MessageDeltaBody
    usage: Usage  # cumulative: clients overwrite their counts with these


class MessageStop(msgspec.Struct, tag="message_stop", tag_field="type"):
    pass


StreamEvent = (MessageStart | Ping | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta
               | MessageStop)
