"""Tool calling through the OpenAI SDK against a real server on the default Gemma model (the
generic tool format): tool_choice required / named / none / auto, streamed tool-call deltas
in the OpenAI shape that reassemble to the non-streamed calls, tool results in the
conversation, and 400s for bad tools."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.slow
jsonschema = pytest.importorskip("jsonschema")

MODEL = "gemma3:270m"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 16}}, "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def chat(client, messages=ASK, **kw):
    kw = {"model": MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 48, "temperature": 0, **kw}
    return client.chat.completions.create(**kw)


def check_calls(calls, names=("get_weather", "get_time")):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def reassemble(stream):
    """Calls from streamed deltas, checking each delta's OpenAI shape on the way."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            if tc.index not in calls:  # the first delta of a call: id, type, name, empty arguments
                assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                assert tc.function.arguments == ""
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:  # later deltas: index and a piece of the arguments only
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    return content, [calls[i] for i in sorted(calls)], finish


def test_required_calls_a_tool(client):
    res = chat(client, tool_choice="required", parallel_tool_calls=False)
    choice = res.choices[0]
    check_calls(choice.message.tool_calls)
    assert len(choice.message.tool_calls) == 1
    assert choice.finish_reason == "tool_calls" and choice.message.content is None


def test_required_parallel_returns_only_complete_calls(client):
    # greedy, this base model repeats calls until max_tokens: the whole answer holds the
    # complete ones, the stream also started the one that was cut off
    whole = chat(client, tool_choice="required", max_tokens=40).choices[0]
    check_calls(whole.message.tool_calls)
    _, streamed, finish = reassemble(chat(client, tool_choice="required", max_tokens=40, stream=True))
    complete = [c for c in streamed if _parses(c["arguments"])]
    assert [(c["name"], c["arguments"]) for c in complete] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert finish == whole.finish_reason


def test_named_function_is_called(client):
    res = chat(client, tool_choice={"type": "function", "function": {"name": "get_time"}})
    check_calls(res.choices[0].message.tool_calls, names=("get_time",))
    assert len(res.choices[0].message.tool_calls) == 1


def test_none_and_auto_answer_without_error(client):
    none = chat(client, tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)
    auto = chat(client, max_tokens=8)  # a base model rarely calls: whatever it writes comes back
    message = auto.choices[0].message
    assert message.tool_calls or isinstance(message.content, str)
    if message.tool_calls:
        check_calls(message.tool_calls)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("tool_choice,parallel", [
    ("required", False),
    ({"type": "function", "function": {"name": "get_weather"}}, True),
], ids=["required", "named"])
def test_streamed_deltas_reassemble_to_the_whole_answer(client, tool_choice, parallel):
    whole = chat(client, tool_choice=tool_choice, parallel_tool_calls=parallel).choices[0]
    content, calls, finish = reassemble(chat(client, tool_choice=tool_choice, parallel_tool_calls=parallel,
                                             stream=True))
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert finish == whole.finish_reason and content == (whole.message.content or "")
    if not parallel:
        assert len(calls) == 1


def test_tool_results_in_the_conversation(client):
    first = chat(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
    ]
    res = chat(client, messages=messages, tool_choice="none", max_tokens=8)
    assert res.choices[0].finish_reason in ("stop", "length") and res.choices[0].message.content
    again = chat(client, messages=messages, tool_choice="required", parallel_tool_calls=False)
    check_calls(again.choices[0].message.tool_calls)
    # the call and its result reached the prompt
    assert again.usage.prompt_tokens > first.usage.prompt_tokens + 20


def post(server, body):
    return httpx.post(server.base_url + "/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4,
                                                                   **body}, timeout=60)


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": 7}}}}}]}, ["tools[0]", "parameters"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]}, ["parameters"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}},
     ["launch_rocket", "get_weather"]),
    ({"tool_choice": "required"}, ["required", "no tools"]),
    ({"tools": TOOLS, "tool_choice": "always"}, ["tool_choice"]),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, ["tool_choice"]),
    ({"messages": [*ASK, {"role": "tool", "content": "18 C"}]}, ["tool_call_id"]),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]}, ["tool_calls[0]"]),
]


@pytest.mark.parametrize("body,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_tools_are_400(server, body, words):
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "Traceback" not in r.text
    for w in words:
        assert w.lower() in err["message"].lower(), err["message"]
