"""Anthropic requests to engine inputs, and engine outcomes to Anthropic's vocabulary.

The conversation becomes the OpenAI-style message list the chat templates (and the tool-call
renderer) already understand: text blocks join into `content`, an assistant's tool_use blocks
become `tool_calls`, a user's tool_result blocks become `tool` messages. Every check that depends
on the request alone happens here, before anything reaches the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

from localserve.engine.guided import GuidedDecoding
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import InvalidRequestError
from localserve.server.anthropic_protocol import (
    MessagesRequest,
    PromptFields,
    TextBlock,
    Tool,
    ToolResultBlock,
    ToolUseBlock,
)
from localserve.server.anthropic_protocol import ToolChoice as AnthropicToolChoice
from localserve.server.tools import ToolChoice, ToolSpec

# blocks a client may send back from an earlier answer that carry nothing for this model
_SKIPPED_BLOCKS = {"thinking", "redacted_thinking"}
_TOOL_CHOICES = {"auto", "any", "tool", "none"}


@dataclass(slots=True)
class ChatInput:
    """The conversation in chat-template form plus what the request says about tools."""

    messages: list[dict[str, Any]]
    tools: list[ToolSpec] = field(default_factory=list)
    choice: ToolChoice = field(default_factory=lambda: ToolChoice("none"))
    parallel: bool = True


def chat_input(req: PromptFields) -> ChatInput:
    if not req.messages:
        raise InvalidRequestError("messages: at least one message is required")
    messages: list[dict[str, Any]] = []
    system = _system_text(req.system)
    if system:
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        if m.role not in ("user", "assistant"):
            raise InvalidRequestError(f"messages.{i}.role: must be 'user' or 'assistant', got {m.role!r} "
                                      "(the system prompt goes in the top-level 'system' field)")
        for msg in _convert(m.role, m.content, f"messages.{i}"):
            _append(messages, msg)
    out = ChatInput(messages=messages, tools=_tools(req.tools or []))
    _apply_tool_choice(out, req.tool_choice)
    return out


def _system_text(system: str | list[dict[str, Any]] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    texts = []
    for j, block in enumerate(system):
        if block.get("type") != "text":
            raise InvalidRequestError(f"system.{j}: only text blocks are allowed in the system prompt, "
                                      f"got type {block.get('type')!r}")
        texts.append(_block(block, TextBlock, f"system.{j}").text)
    return "\n\n".join(texts)


def _convert(role: str, content: str | list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results first (as `tool` messages, the order
    Anthropic requires), then the text with the assistant's tool calls."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type")
        at = f"{where}.content.{j}"
        if kind == "text":
            texts.append(_block(block, TextBlock, at).text)
        elif kind == "tool_use":
            if role != "assistant":
                raise InvalidRequestError(f"{at}: tool_use blocks belong in assistant messages")
            use = _block(block, ToolUseBlock, at)
            calls.append({"id": use.id, "type": "function",
                          "function": {"name": use.name, "arguments": json.dumps(use.input, ensure_ascii=False)}})
        elif kind == "tool_result":
            if role != "user":
                raise InvalidRequestError(f"{at}: tool_result blocks belong in user messages")
            res = _block(block, ToolResultBlock, at)
            text = _result_text(res.content, at)
            results.append({"role": "tool", "tool_call_id": res.tool_use_id,
                            "content": f"Error: {text}" if res.is_error else text})
        elif kind in _SKIPPED_BLOCKS:
            continue
        else:
            raise InvalidRequestError(f"{at}: content blocks of type {kind!r} are not supported by this server "
                                      "(text, tool_use and tool_result are)")
    out = list(results)
    if texts or calls or not results:
        msg: dict[str, Any] = {"role": role, "content": "\n\n".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _result_text(content: str | list[dict[str, Any]] | None, at: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for k, block in enumerate(content):
        if block.get("type") != "text":
            raise InvalidRequestError(f"{at}.content.{k}: only text is supported in a tool_result, "
                                      f"got type {block.get('type')!r}")
        texts.append(_block(block, TextBlock, f"{at}.content.{k}").text)
    return "\n\n".join(texts)


def _append(messages: list[dict[str, Any]], msg: dict[str, Any]) -> None:
    """Consecutive plain turns of one role merge (Anthropic's API does so; templates such as
    Gemma's insist that roles alternate)."""
    prev = messages[-1] if messages else None
    if (prev is not None and prev["role"] == msg["role"] and msg["role"] in ("user", "assistant")
            and "tool_calls" not in prev):
        prev["content"] = "\n\n".join(t for t in (prev["content"], msg["content"]) if t)
        if "tool_calls" in msg:
            prev["tool_calls"] = msg["tool_calls"]
    else:
        messages.append(msg)


def _block(block: dict[str, Any], kind: type, at: str):
    try:
        return msgspec.convert(block, kind)
    except msgspec.ValidationError as e:
        raise InvalidRequestError(f"{at}: {e}") from None


def _tools(tools: list[Tool]) -> list[ToolSpec]:
    out = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            raise InvalidRequestError(f"tools.{i}: server tools ({tool.type!r}) are not supported; "
                                      "define client tools with name, description and input_schema")
        out.append(ToolSpec.checked(tool.name, tool.description, tool.input_schema, where=f"tools.{i}.input_schema"))
    names = [t.name for t in out]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidRequestError(f"tools: tool names must be unique, {dup[0]!r} appears more than once")
    return out


def _apply_tool_choice(out: ChatInput, choice: AnthropicToolChoice | None) -> None:
    """Anthropic's auto / any / tool / none as ToolChoice auto / required / function / none;
    without a tool_choice, tools mean auto."""
    if choice is None:
        out.choice = ToolChoice("auto" if out.tools else "none")
        return
    if choice.type not in _TOOL_CHOICES:
        raise InvalidRequestError(f"tool_choice.type: must be one of {sorted(_TOOL_CHOICES)}, got {choice.type!r}")
    out.parallel = not choice.disable_parallel_tool_use
    if choice.type in ("any", "tool") and not out.tools:
        raise InvalidRequestError(f"tool_choice {choice.type!r} needs at least one tool in 'tools'")
    if choice.type == "tool":
        names = [t.name for t in out.tools]
        if not choice.name:
            raise InvalidRequestError("tool_choice.name: required when tool_choice.type is 'tool'")
        if choice.name not in names:
            raise InvalidRequestError(f"tool_choice.name: no tool named {choice.name!r} in tools "
                                      f"(have: {', '.join(names)})")
        out.choice = ToolChoice("function", choice.name)
    else:
        out.choice = ToolChoice({"any": "required"}.get(choice.type, choice.type))


# -- sampling ------------------------------------------------------------------------------------


def sampling_params(req: MessagesRequest) -> SamplingParams:
    stop = list(req.stop_sequences or [])
    if any(not s for s in stop):
        raise InvalidRequestError("stop_sequences: a stop sequence must not be empty")
    if req.temperature is not None and not 0.0 <= req.temperature <= 1.0:
        raise InvalidRequestError(f"temperature: must be in [0, 1], got {req.temperature}")
    if req.top_k is not None and req.top_k < 0:
        raise InvalidRequestError(f"top_k: must be at least 0, got {req.top_k}")
    if req.max_tokens < 1:
        raise InvalidRequestError(f"max_tokens: must be at least 1, got {req.max_tokens}")
    return SamplingParams(
        max_tokens=req.max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        stop=stop,
        guided=_output_format(req.output_config),
    )


def fit_max_tokens(params: SamplingParams, num_prompt_tokens: int, max_context: int) -> None:
    """max_tokens is required here, and agents send a ceiling meant for a far larger context
    (Claude Code: 32000): it is capped at the room the prompt leaves, the answer then stops
    with stop_reason max_tokens. A prompt that leaves no room is still a 400 (the engine's)."""
    room = max_context - num_prompt_tokens
    if room >= 1 and params.max_tokens is not None and params.max_tokens > room:
        params.max_tokens = room


def _output_format(config: dict[str, Any] | None) -> GuidedDecoding | None:
    """output_config.format {"type": "json_schema", "schema": {...}}: structured outputs."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise InvalidRequestError('output_config.format: must be {"type": "json_schema", "schema": {...}}')
    return GuidedDecoding(json_schema=fmt["schema"])


def stop_reason(finish_reason: str | None, engine_stop: int | str | None,
                stop_sequences: list[str] | None, called_tools: bool = False) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished answer."""
    if finish_reason == "length":
        return "max_tokens", None
    if called_tools:
        return "tool_use", None
    if finish_reason == "stop" and isinstance(engine_stop, str) and engine_stop in (stop_sequences or ()):
        return "stop_sequence", engine_stop
    return "end_turn", None
