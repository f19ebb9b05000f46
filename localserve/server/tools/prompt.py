"""Conversations with tools as the chat template gets them.

A template that renders tools (Qwen, Llama 3.1, Mistral, ChatML) gets the tools and the tool
turns as they are, the call arguments parsed to objects as transformers' templates expect.
A template without tool support (the default Gemma 3) gets a system instruction that
describes the tools and the generic call format, assistant calls written out in that format,
and tool results as user turns; turns of the same role are then merged, because such
templates insist that user and assistant alternate.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from localserve.server.tools.formats import GENERIC
from localserve.server.tools.spec import ToolChoice, ToolSpec


def _calls_of(message: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """(id, name, arguments) of an assistant message's tool_calls."""
    out = []
    for call in message.get("tool_calls") or []:
        if not isinstance(call, Mapping):
            continue
        fn = call.get("function") if isinstance(call.get("function"), Mapping) else call
        out.append((str(call.get("id", "")), str(fn.get("name", "")), fn.get("arguments", {})))
    return out


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For templates with tool support: arguments given as JSON text become objects."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for call_id, name, arguments in _calls_of(m):
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except ValueError:
                        pass  # the template prints the text as it is
                calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
            m["tool_calls"] = calls
        out.append(m)
    return out


def tool_instruction(tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
    lines = ["You have access to the following tools (functions), described in JSON:"]
    lines += [json.dumps(t.to_openai()["function"], ensure_ascii=False) for t in tools]
    lines += [
        "",
        "To call a tool, answer with a block in exactly this form:",
        GENERIC.render_calls([("<tool name>", "{<the arguments as a JSON object>}")]),
        "The result comes back in the next message. If no tool is needed, answer normally.",
    ]
    if not parallel:
        lines.append("Call at most one tool per answer.")
    if choice.mode == "required":
        lines.append("You must call a tool now.")
    elif choice.mode == "function":
        lines.append(f"You must call the tool {choice.name} now.")
    return "\n".join(lines)


def generic_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec], choice: ToolChoice,
                     parallel: bool) -> list[dict[str, Any]]:
    """For templates without tool support; `tools` empty means no instruction (tool_choice
    none), the tool turns are still written out."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = _calls_of(m)
            names.update((call_id, name) for call_id, name, _ in calls)
            text = GENERIC.render_calls([(name, _arguments_text(args)) for _, name, args in calls])
            out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
        elif role == "tool":
            name = names.get(str(m.get("tool_call_id"))) or m.get("name") or "the tool"
            out.append({"role": "user", "content": f"Result of {name}:\n{content}"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        instruction = tool_instruction(tools, choice, parallel)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instruction}"}
        else:
            out.insert(0, {"role": "system", "content": instruction})
    return _merge_roles(out)


def _merge_roles(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] in ("user", "assistant"):
            out[-1] = {"role": m["role"], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(m)
    return out
