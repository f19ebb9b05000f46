"""Responses API requests to engine inputs.

`instructions` and the input items become the OpenAI-style message list the chat templates and
the tool-call renderer already understand: message items keep their text, `function_call` items
become the preceding assistant turn's `tool_calls`, `function_call_output` items become `tool`
messages. The server is stateless: the client sends the whole conversation every time (as Codex
does with store=false), so `previous_response_id` is refused. Every check that depends on the
request alone happens here, before anything reaches the engine.
"""

from __future__ import annotations

from typing import AbstractSet, Any

from localserve.engine.guided import GuidedDecoding
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import InvalidRequestError
from localserve.server.anthropic_adapter import ChatInput
from localserve.server.request_log import note
from localserve.server.responses_protocol import ResponsesRequest
from localserve.server.tools import ToolChoice, ToolSpec

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = {"input_text", "output_text", "text"}
# items a client replays from an earlier answer that carry nothing this model can use
_SKIPPED_ITEMS = {"reasoning"}
_CHOICE_MODES = ("auto", "none", "required")


def check_stateless(req: ResponsesRequest) -> None:
    if req.previous_response_id is not None:
        raise InvalidRequestError("previous_response_id: this server is stateless and stores no responses; "
                                  "send the whole conversation in 'input' (as with store=false)")
    if req.conversation is not None:
        raise InvalidRequestError("conversation: this server is stateless and keeps no conversations; "
                                  "send the whole conversation in 'input'")
    if req.background:
        raise InvalidRequestError("background: background responses need stored responses, "
                                  "which this stateless server does not keep")


def chat_input(req: ResponsesRequest) -> ChatInput:
    check_stateless(req)
    if req.input is None or req.input == "" or req.input == []:
        raise InvalidRequestError("input: required; give a string or a list of input items")
    # system and developer text before the conversation joins `instructions` as the leading
    # system prompt; later system turns keep their place (the chat template places them, so a
    # new one does not change the prompt before it and the prefix cache still holds)
    system = [req.instructions] if req.instructions else []
    messages: list[dict[str, Any]] = []
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        _add_item(messages, system, item, f"input[{i}]")
    if not messages:
        raise InvalidRequestError("input: needs at least one user, assistant or tool item besides system text")
    if any(system):
        messages.insert(0, {"role": "system", "content": "\n\n".join(t for t in system if t)})
    out = ChatInput(messages=messages, tools=tools_of(req.tools), parallel=req.parallel_tool_calls)
    out.choice = tool_choice_of(req.tool_choice, out.tools)
    return out


def _add_item(messages: list[dict[str, Any]], system: list[str], item: Any, at: str) -> None:
    if not isinstance(item, dict):
        raise InvalidRequestError(f"{at}: an input item must be an object")
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = _ROLES.get(item.get("role"))
        if role is None:
            raise InvalidRequestError(f"{at}.role: must be one of user, assistant, system, developer; "
                                      f"got {item.get('role')!r}")
        text = _text(item.get("content"), f"{at}.content")
        if role == "system" and not messages:
            system.append(text)
        elif role == "system":
            messages.append({"role": "system", "content": text})
        else:
            _append(messages, {"role": role, "content": text})
    elif kind == "function_call":
        name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
        namespace = item.get("namespace")
        if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(args, str):
            raise InvalidRequestError(f"{at}: a function_call item needs string call_id, name and arguments")
        if namespace is not None and not isinstance(namespace, str):
            raise InvalidRequestError(f"{at}.namespace: must be a string")
        name = qualified_name(namespace, name)
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
        prev = messages[-1] if messages else None
        # a run of function_call items are one assistant turn's calls (parallel calls)
        if prev is not None and prev["role"] == "assistant":
            prev.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output":
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise InvalidRequestError(f"{at}.call_id: a function_call_output item needs the call_id it answers")
        messages.append({"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output"), f"{at}.output")})
    elif kind in _SKIPPED_ITEMS:
        return
    elif kind == "item_reference":
        raise InvalidRequestError(f"{at}: item_reference needs stored items; this server is stateless")
    elif kind is None:
        raise InvalidRequestError(f"{at}.type: required (message, function_call, function_call_output, ...)")
    else:
        # hosted tools' calls and results (web_search_call, ...) and item types this server
        # does not know: nothing this model can act on
        note(f"ignored an input item of type {kind!r}")


def _text(content: Any, at: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequestError(f"{at}: must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{at}[{j}]: only text parts (input_text, output_text) are supported by "
                                      f"this model, got type {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def _append(messages: list[dict[str, Any]], msg: dict[str, Any]) -> None:
    """Consecutive user (or assistant) turns merge: templates such as Gemma's insist that roles
    alternate."""
    prev = messages[-1] if messages else None
    if prev is not None and prev["role"] == msg["role"] and "tool_calls" not in prev:
        prev["content"] = "\n\n".join(t for t in (prev["content"], msg["content"]) if t)
    else:
        messages.append(msg)


# -- tools ---------------------------------------------------------------------------------------


NAMESPACE_SEPARATOR = "."


def qualified_name(namespace: str | None, name: str) -> str:
    """The name the model sees for a function of a namespace tool: `namespace.name` (OpenAI's
    function names cannot hold a dot, so it never meets a plain function's name)."""
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name


def split_name(qualified: str, namespaces: AbstractSet[str]) -> tuple[str | None, str]:
    """(namespace, name) of a name the model called."""
    namespace, sep, name = qualified.partition(NAMESPACE_SEPARATOR)
    return (namespace, name) if sep and namespace in namespaces else (None, qualified)


def namespaces_of(tools: list[dict[str, Any]] | None) -> set[str]:
    return {t["name"] for t in tools or [] if t.get("type") == "namespace" and isinstance(t.get("name"), str)}


def tools_of(tools: list[dict[str, Any]] | None) -> list[ToolSpec]:
    """Function tools {type: function, name, description, parameters, strict}, and the function
    tools of namespace tools {type: namespace, name, tools: [...]}, which the model sees as
    `namespace.name`. Hosted tools (web_search, file_search, local_shell, ...) run on OpenAI's
    side: the model is not shown them."""
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"tools[{i}]: a tool must be an object")
        kind = tool.get("type")
        if kind == "function":
            out.append(ToolSpec.checked(tool.get("name"), tool.get("description"), tool.get("parameters"),
                                        where=f"tools[{i}]"))
        elif kind == "namespace":
            out += _namespace_tools(tool, f"tools[{i}]")
        else:
            note(f"left out hosted tool {kind!r}")
    names = [t.name for t in out]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidRequestError(f"tools: function names must be unique, {dup[0]!r} appears more than once")
    return out


def tool_choice_of(choice: str | dict[str, Any] | None, tools: list[ToolSpec]) -> ToolChoice:
    """auto | none | required | {type: function, name}; without one, tools mean auto. The
    ToolPlan checks required-without-tools and names that are not in tools."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in _CHOICE_MODES:
            raise InvalidRequestError(f"tool_choice: must be one of {', '.join(_CHOICE_MODES)} or "
                                      f"{{\"type\": \"function\", \"name\": ...}}, got {choice!r}")
        return ToolChoice(choice)
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InvalidRequestError('tool_choice: an object must be {"type": "function", "name": ...}; '
                                  f"got type {choice.get('type')!r}")
    return ToolChoice("function", choice["name"])


def _namespace_tools(tool: dict[str, Any], at: str) -> list[ToolSpec]:
    namespace, members = tool.get("name"), tool.get("tools")
    if not isinstance(namespace, str) or not namespace or NAMESPACE_SEPARATOR in namespace:
        raise InvalidRequestError(f"{at}.name: a namespace tool needs a name without '.'")
    if not isinstance(members, list):
        raise InvalidRequestError(f"{at}.tools: a namespace tool needs its list of tools")
    out = []
    for j, member in enumerate(members):
        if not isinstance(member, dict) or member.get("type") != "function":
            note(f"left out tool of type {member.get('type') if isinstance(member, dict) else None!r} "
                 f"in namespace {namespace!r}")
            continue
        name = member.get("name")
        out.append(ToolSpec.checked(qualified_name(namespace, name) if isinstance(name, str) else name,
                                    member.get("description"), member.get("parameters"), where=f"{at}.tools[{j}]"))
    return out


# -- sampling ------------------------------------------------------------------------------------


def sampling_params(req: ResponsesRequest) -> SamplingParams:
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise InvalidRequestError(f"max_output_tokens: must be at least 1, got {req.max_output_tokens}")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise InvalidRequestError(f"temperature: must be in [0, 2], got {req.temperature}")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise InvalidRequestError(f"top_p: must be in (0, 1], got {req.top_p}")
    return SamplingParams(
        max_tokens=req.max_output_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        guided=text_format(req.text),
    )


def text_format(text: dict[str, Any] | None) -> GuidedDecoding | None:
    """text.format: text (free), json_object, or json_schema {name, schema, strict}."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecoding(json_object=True)
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("text.format.schema: a json_schema format needs the JSON schema object")
        try:
            return GuidedDecoding(json_schema=schema)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"text.format.schema: {e}") from None
    raise InvalidRequestError(f"text.format.type: must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def text_echo(text: dict[str, Any] | None) -> dict[str, Any]:
    return {**(text or {}), "format": (text or {}).get("format") or {"type": "text"}}
