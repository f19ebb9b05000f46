"""Anthropic requests to engine inputs, and engine outcomes to Anthropic's vocabulary.

The conversation becomes the OpenAI-style message list the chat templates (and the tool-call
renderer) already understand: text blocks join into `content`, an assistant's tool_use blocks
become `tool_calls`, a user's tool_result blocks become `tool` messages. Every check that depends
on the request alone happens here, before anything reaches the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

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
from localserve.server.anthropic_betas import ADVANCED_TOOL_USE, MID_CONVERSATION_TOOL_CHANGES, refuse_feature
from localserve.server.request_log import note
from localserve.server.tools import ToolChoice, ToolSpec
from localserve.server.volatile_text import is_volatile

# blocks a client may send back from an earlier answer that carry nothing for this model
_SKIPPED_BLOCKS = {"thinking", "redacted_thinking"}
# blocks this text model cannot read: leaving them out would change what the request means
_REFUSED_BLOCKS = {"image", "document", "container_upload"}
_TOOL_CHOICES = {"auto", "any", "tool", "none"}


@dataclass(slots=True)
class ChatInput:
    """The conversation in chat-template form plus what the request says about tools."""

    messages: list[dict[str, Any]]
    tools: list[ToolSpec] = field(default_factory=list)
    choice: ToolChoice = field(default_factory=lambda: ToolChoice("none"))
    parallel: bool = True


def chat_input(req: PromptFields, betas: Sequence[str] = ()) -> ChatInput:
    """betas: the request's `anthropic-beta` values (they decide how a feature this server
    cannot honour is refused)."""
    if not req.messages:
        raise InvalidRequestError("messages: at least one message is required")
    messages: list[dict[str, Any]] = []
    system = _system_text(req.system, "system", betas)
    if system:
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        if m.role == "system":
            # Claude Code's mid-conversation system turns: the chat template places them
            messages.append({"role": "system", "content": _system_text(m.content, f"messages.{i}.content", betas)})
            continue
        if m.role not in ("user", "assistant"):
            raise InvalidRequestError(f"messages.{i}.role: must be 'user', 'assistant' or 'system', got {m.role!r}")
        for msg in _convert(m.role, m.content, f"messages.{i}"):
            _append(messages, msg)
    if all(m["role"] == "system" for m in messages):
        raise InvalidRequestError("messages: at least one user or assistant message is required")
    out = ChatInput(messages=messages, tools=_tools(req.tools or [], betas))
    _apply_tool_choice(out, req.tool_choice)
    return out


def _system_text(system: str | list[dict[str, Any]] | None, where: str, betas: Sequence[str]) -> str:
    """System text; blocks whose text changes with every request and means nothing here (an
    agent's billing header) are dropped, so the prompt's prefix stays the same."""
    if system is None or isinstance(system, str):
        return system or ""
    texts = []
    for j, block in enumerate(system):
        kind = block.get("type")
        if kind in ("tool_addition", "tool_removal"):
            refuse_feature(betas, MID_CONVERSATION_TOOL_CHANGES,
                           f"{where}.{j}: {kind} blocks (tools changed mid-conversation) are not supported by "
                           "this server; send the tools in the top-level 'tools' field")
        if kind != "text":
            raise InvalidRequestError(f"{where}.{j}: only text blocks are allowed in system text, got type {kind!r}")
        text = _block(block, TextBlock, f"{where}.{j}").text
        if is_volatile(text):
            note("dropped a volatile system block (billing header) for the prefix cache")
        else:
            texts.append(text)
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
        elif kind in _REFUSED_BLOCKS:
            raise InvalidRequestError(f"{at}: content blocks of type {kind!r} are not supported by this text-only "
                                      "model (text, tool_use and tool_result are)")
        else:
            # server tools' history (server_tool_use, web_search_tool_result, ...) and types
            # this server does not know carry nothing this model can act on
            note(f"ignored a {kind!r} content block")
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
        kind = block.get("type")
        if kind == "text":
            texts.append(_block(block, TextBlock, f"{at}.content.{k}").text)
        elif kind in _REFUSED_BLOCKS:
            raise InvalidRequestError(f"{at}.content.{k}: a tool_result of type {kind!r} cannot be read by this "
                                      "text-only model")
        else:
            note(f"ignored a {kind!r} block in a tool_result")
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


def _tools(tools: list[Tool], betas: Sequence[str]) -> list[ToolSpec]:
    out = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            # server tools (web_search_..., code_execution_...) and Anthropic-defined ones run
            # on Anthropic's side or have no schema here: the model is not shown them
            note(f"left out tool {tool.name!r} of type {tool.type!r} (server and Anthropic-defined tools)")
            continue
        if tool.defer_loading:
            refuse_feature(betas, ADVANCED_TOOL_USE,
                           f"tools.{i}.defer_loading: deferred tools need a server-side tool search, which this "
                           "server does not have; send the tool's full definition")
        if tool.input_schema is None:
            raise InvalidRequestError(f"tools.{i}.input_schema: required for a client tool")
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
