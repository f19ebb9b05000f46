"""The Anthropic Messages API of a real `localserve up` process, through the `anthropic` SDK; and
the request adapter on its own (no server)."""

from __future__ import annotations

import json
import re
import time
import uuid

import httpx
import msgspec
import pytest
from litestar.exceptions import HTTPException

from localserve.errors import (
    ContextOverflowError,
    EngineOverloadedError,
    InvalidRequestError,
)
from localserve.server.anthropic_adapter import (
    chat_input,
    fit_max_tokens,
    sampling_params,
    stop_reason,
)
from localserve.server.anthropic_answer import AnswerBlocks
from localserve.server.anthropic_errors import (
    on_http_error,
    on_localserve_error,
    on_unexpected_error,
)
from localserve.server.anthropic_protocol import CountTokensRequest, MessagesRequest
from localserve.server.reasoning import ReasoningParser
from localserve.server.tools import (
    GENERIC,
    OutputParser,
    ToolCallParser,
    ToolChoice,
    ToolSpec,
)

anthropic = pytest.importorskip("anthropic")

MODEL = "gemma3:270m"
HELLO = [{"role": "user", "content": "Write a list of five fruits."}]
# this SDK no longer offers temperature/top_p/top_k as arguments; the API still takes them
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# -- through the SDK against a real server -------------------------------------------------------


@pytest.mark.slow
def test_text_whole_stream_and_stream_helper_agree(claude):
    whole = claude.messages.create(model=MODEL, max_tokens=10, **GREEDY, messages=HELLO)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == MODEL
    assert whole.id.startswith("msg_") and whole._request_id and whole._request_id.startswith("req_")
    assert [b.type for b in whole.content] == ["text"] and text_of(whole)
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.stop_sequence is None
    assert 0 < whole.usage.output_tokens <= 10 and whole.usage.cache_creation_input_tokens == 0

    events = list(claude.messages.create(model=MODEL, max_tokens=10, **GREEDY, messages=HELLO, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1:-2] == ["content_block_start"] + ["content_block_delta"] * (len(kinds) - 5) + ["content_block_stop"]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == text_of(whole)
    assert events[-2].delta.stop_reason == whole.stop_reason
    assert events[-2].usage.output_tokens == whole.usage.output_tokens

    with claude.messages.stream(model=MODEL, max_tokens=10, **GREEDY, messages=HELLO) as stream:
        final = stream.get_final_message()
    assert text_of(final) == text_of(whole) and final.stop_reason == whole.stop_reason
    total = lambda u: u.input_tokens + u.cache_read_input_tokens  # noqa: E731
    assert total(final.usage) == total(whole.usage) and final.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.slow
def test_stop_sequence_and_max_tokens(claude):
    # a system prompt in blocks with cache_control, which is accepted and changes nothing here
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    sampling = {"temperature": 0, "top_k": 40, "top_p": 0.9}
    capped = claude.messages.create(model=MODEL, max_tokens=12, system=system, messages=HELLO,
                                    metadata={"user_id": "u1"}, extra_body=sampling)
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 12
    text = text_of(capped)
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    stopped = claude.messages.create(model=MODEL, max_tokens=12, system=system, messages=HELLO,
                                     metadata={"user_id": "u1"}, extra_body=sampling, stop_sequences=["@@", stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert text_of(stopped) == text[: text.index(stop)].rstrip() or text_of(stopped) == text[: text.index(stop)]


@pytest.mark.slow
def test_prefix_cache_reads_and_count_tokens(claude):
    # a nonce first, so the first request cannot hit anything another test left in the cache
    system = f"[{uuid.uuid4().hex}] " + " ".join(f"Rule {i}: answer about topic number {i}." for i in range(24))
    kw = dict(model=MODEL, system=system, messages=HELLO)
    first = claude.messages.create(max_tokens=2, **GREEDY, **kw)
    second = claude.messages.create(max_tokens=2, **GREEDY, **kw)
    counted = claude.messages.count_tokens(**kw).input_tokens
    assert counted > 200
    # Anthropic's usage: input_tokens are the prompt tokens not read from the cache
    for m in (first, second):
        assert m.usage.input_tokens + m.usage.cache_read_input_tokens == counted
        assert m.usage.cache_creation_input_tokens == 0
    assert first.usage.cache_read_input_tokens < 32
    assert second.usage.cache_read_input_tokens > 0.8 * counted
    with claude.messages.stream(max_tokens=2, **GREEDY, **kw) as stream:
        start = next(e for e in stream if e.type == "message_start")
        assert start.message.usage.cache_read_input_tokens > 0.8 * counted
        final = stream.get_final_message()
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == counted


@pytest.mark.slow
def test_errors_in_anthropic_shape(claude, server):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.post("/v1/messages", cast_to=httpx.Response, body={"model": MODEL, "messages": HELLO})
    assert e.value.status_code == 400
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in e.value.body["error"]["message"]

    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-opus-4-1", max_tokens=4, messages=HELLO)
    assert e.value.body["error"]["type"] == "not_found_error" and "claude-opus-4-1" in e.value.message
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="claude-opus-4-1", messages=HELLO)

    bad = [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
        ({"messages": [{"role": "system", "content": "x"}]}, "user or assistant"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": HELLO, "temperature": 3}, "temperature"),
        # Anthropic's wording, which Claude Code recognises (it compacts and retries)
        ({"messages": [{"role": "user", "content": "word " * 40000}]}, "prompt is too long: "),
        ({"messages": HELLO, "tool_choice": {"type": "tool", "name": "nope"}}, "tool"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0"),
    ]
    for body, word in bad:
        r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "max_tokens": 4, **body},
                       headers={"anthropic-version": "2023-06-01"}, timeout=60)
        assert r.status_code == 400, (body, r.text)
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", r.text
        assert word in err["error"]["message"], (word, r.text)
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": "word " * 40000}]}, timeout=60)
    assert re.fullmatch(r"prompt is too long: \d+ tokens > \d+ maximum", r.json()["error"]["message"]), r.text
    r = httpx.post(server.url + "/v1/messages", content=b'{"model": "x", "messages": [', timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


@pytest.mark.slow
def test_full_server_answers_529_overloaded(claude, server):
    """The server fixture runs 4 sequences and queues none: a fifth is refused at once."""
    ask = [{"role": "user", "content": "Tell a very long story."}]
    streams = [claude.messages.create(model=MODEL, max_tokens=300, messages=ask, stream=True) for _ in range(4)]
    try:
        with pytest.raises(anthropic.OverloadedError) as e:
            claude.messages.create(model=MODEL, max_tokens=4, messages=HELLO)
        assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        for s in streams:
            s.close()  # leaving aborts them and frees the server for the next test
        deadline = time.monotonic() + 30
        while "localserve_requests_running 0" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "the closed streams were not aborted"
            time.sleep(0.2)


@pytest.mark.slow
def test_api_key_via_x_api_key(tiny_server):
    bad = anthropic.Anthropic(base_url=tiny_server.url, api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="tiny-llama", max_tokens=2, messages=HELLO)
    assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(tiny_server.url + "/v1/messages/count_tokens", json={"model": "", "messages": HELLO}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    good = anthropic.Anthropic(base_url=tiny_server.url, api_key="sekret", max_retries=0, timeout=60)
    # past the guard: this random model has no tokenizer, which is the client's problem (400), not auth
    with pytest.raises(anthropic.BadRequestError) as e:
        good.messages.count_tokens(model="", messages=HELLO)
    assert "tokenizer" in e.value.message


WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
                            "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.slow
def test_forced_tool_use_whole_and_stream_helper(claude):
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER])
    forced = {"type": "tool", "name": "get_weather"}
    whole = claude.messages.create(max_tokens=40, tool_choice=forced, **GREEDY, **kw)
    assert whole.stop_reason == "tool_use", whole
    (use,) = [b for b in whole.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] in ("Paris", "Tokyo") and use.id.startswith("toolu_")
    assert whole.usage.input_tokens + whole.usage.cache_read_input_tokens == claude.messages.count_tokens(
        tool_choice=forced, **kw).input_tokens

    with claude.messages.stream(max_tokens=40, tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                 **GREEDY, **kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert streamed.name == "get_weather" and streamed.input == use.input
    deltas = [e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert deltas and json.loads("".join(e.delta.partial_json for e in deltas)) == use.input

    # the answer goes back as a tool_result; tool_choice none shows no tools and calls none
    history = ASK + [{"role": "assistant", "content": [{"type": "text", "text": "Checking."}, use.model_dump()]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                   "content": "Sunny, 21 C"}]}]
    reply = claude.messages.create(model=MODEL, max_tokens=8, messages=history, tools=[WEATHER],
                                   tool_choice={"type": "none"}, **GREEDY)
    assert reply.stop_reason in ("end_turn", "max_tokens") and all(b.type == "text" for b in reply.content)
    with_tools = claude.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER]).input_tokens
    without = claude.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER],
                                           tool_choice={"type": "none"}).input_tokens
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == without < with_tools

    # under auto this small model may or may not call: either way a well-formed answer, never a 500
    auto = claude.messages.create(model=MODEL, max_tokens=16, messages=ASK, tools=[WEATHER], **GREEDY)
    assert auto.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert all(b.type == "text" or (b.type == "tool_use" and b.name == "get_weather") for b in auto.content)


@pytest.mark.slow
def test_output_config_json_schema(claude):
    schema = {"type": "object", "properties": {"fruit": {"type": "string", "enum": ["apple", "pear"]},
                                               "count": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["fruit", "count"], "additionalProperties": False}
    res = claude.messages.create(model=MODEL, max_tokens=30, messages=HELLO, **GREEDY,
                                 output_config={"format": {"type": "json_schema", "schema": schema}})
    value = json.loads(text_of(res))
    assert value["fruit"] in ("apple", "pear") and 1 <= value["count"] <= 9 and set(value) == {"fruit", "count"}
    # a schema the grammar compiler refuses is a 400, streamed or not (the status waits for prefill)
    bad = {"format": {"type": "json_schema", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(?<=a)b"}}}}}
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.create(model=MODEL, max_tokens=5, messages=HELLO, output_config=bad, stream=stream)
        assert e.value.body["error"]["type"] == "invalid_request_error" and "schema" in e.value.message


@pytest.mark.slow
def test_assistant_prefill_is_continued(claude):
    ask = [{"role": "user", "content": "Count from one to ten."}]
    prefilled = ask + [{"role": "assistant", "content": "One, two, three,"}]
    res = claude.messages.create(model=MODEL, max_tokens=4, messages=prefilled, **GREEDY)
    assert text_of(res).lstrip().startswith("four"), text_of(res)
    assert claude.messages.count_tokens(model=MODEL, messages=prefilled).input_tokens == (
        res.usage.input_tokens + res.usage.cache_read_input_tokens)


# -- the adapter alone -----------------------------------------------------------------------------


def decode(body: dict, kind=MessagesRequest):
    import msgspec

    return msgspec.convert({"model": MODEL, **body}, kind)


def test_conversation_with_tool_blocks_becomes_chat_messages():
    req = decode({
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools.",
                                                             "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "x"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True},
                {"type": "text", "text": "Thanks"}]},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "tools": [{"name": "weather", "description": "Weather by city",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }, CountTokensRequest)
    chat = chat_input(req)
    assert chat.messages == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
        {"role": "user", "content": "Thanks\n\nAnd tomorrow?"},  # consecutive user turns merge
    ]
    assert chat.tools == [ToolSpec("weather", "Weather by city",
                                   {"type": "object", "properties": {"city": {"type": "string"}}})]
    assert chat.choice == ToolChoice("required") and chat.parallel is False
    tools = {"tools": [{"name": "f", "input_schema": {"type": "object"}}]}
    for given, expected in [(None, ToolChoice("auto")), ({"type": "none"}, ToolChoice("none")),
                            ({"type": "tool", "name": "f"}, ToolChoice("function", "f"))]:
        chat = chat_input(decode({"messages": HELLO, **tools, "tool_choice": given}, CountTokensRequest))
        assert chat.choice == expected and chat.parallel
    assert chat_input(decode({"messages": HELLO}, CountTokensRequest)).choice == ToolChoice("none")


@pytest.mark.parametrize("body,words", [
    ({"messages": []}, ["at least one"]),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
     ["tool_result", "user"]),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     ["tool_use", "assistant"]),
    ({"messages": HELLO, "system": [{"type": "image"}]}, ["system.0"]),
    ({"messages": HELLO, "tool_choice": {"type": "any"}}, ["needs at least one tool"]),
    ({"messages": HELLO, "tool_choice": {"type": "sometimes"}}, ["tool_choice.type"]),
    ({"messages": HELLO, "tools": [{"name": "f", "input_schema": {"type": "array"}}]}, ["tools.0.input_schema"]),
    ({"messages": HELLO, "tools": [{"name": "f", "input_schema": {"type": "object", "properties": 3}}]},
     ["tools.0.input_schema"]),
    ({"messages": HELLO, "tools": [{"name": "f", "input_schema": {}}, {"name": "f", "input_schema": {}}]},
     ["unique"]),
    ({"messages": HELLO, "tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool"}},
     ["tool_choice.name"]),
    # server tools are left out (test_agent_wire); deferred tools need a tool search it does not have
    ({"messages": HELLO, "tools": [{"name": "f", "input_schema": {}, "defer_loading": True}]},
     ["tools.0.defer_loading"]),
    ({"messages": HELLO, "tools": [{"name": "f"}]}, ["tools.0.input_schema"]),
])
def test_bad_conversations_name_the_problem(body, words):
    with pytest.raises(InvalidRequestError) as e:
        chat_input(decode({"max_tokens": 5, **body}))
    for w in words:
        assert w in str(e.value)


def test_sampling_params_and_stop_reasons():
    p = sampling_params(decode({"messages": HELLO, "max_tokens": 7, "stop_sequences": ["END"], "top_k": 5,
                                "temperature": 0.5, "thinking": {"type": "enabled", "budget_tokens": 1024}}))
    assert (p.max_tokens, p.stop, p.top_k, p.temperature, p.top_p) == (7, ["END"], 5, 0.5, 1.0)
    for body in ({"stop_sequences": [""]}, {"temperature": 1.5}, {"max_tokens": 0}, {"top_k": -1}):
        with pytest.raises(InvalidRequestError):
            sampling_params(decode({"messages": HELLO, "max_tokens": 7, **body}))
    p = sampling_params(decode({"messages": HELLO, "max_tokens": 32000}))
    fit_max_tokens(p, 30000, 32768)
    assert p.max_tokens == 2768
    fit_max_tokens(p, 100, 32768)
    assert p.max_tokens == 2768
    fit_max_tokens(p, 40000, 32768)  # no room: left for the engine's 400
    assert p.max_tokens == 2768
    assert stop_reason("length", None, ["x"]) == ("max_tokens", None)
    assert stop_reason("stop", "x", ["x"]) == ("stop_sequence", "x")
    assert stop_reason("stop", 1, ["x"]) == ("end_turn", None)
    assert stop_reason("stop", None, None) == ("end_turn", None)


# -- content blocks from output text (the real parsers, no server) -----------------------------------

THOUGHT_CALL = ('<think>Paris is a city.</think>Let me check. ```tool_call\n'
                '{"name": "get_weather", "arguments": {"city": "Paris"}}\n```')


def answer_blocks(show_thinking: bool) -> AnswerBlocks:
    return AnswerBlocks(OutputParser(ReasoningParser(), ToolCallParser(GENERIC, ["get_weather"])), show_thinking)


@pytest.mark.parametrize("size", [1, 3, 7, len(THOUGHT_CALL)])
def test_blocks_do_not_depend_on_how_the_text_arrives(size):
    answer = answer_blocks(show_thinking=True)
    events = []
    for i in range(0, len(THOUGHT_CALL), size):
        events += answer.feed(THOUGHT_CALL[i:i + size])
    events += answer.finish()
    assert [type(b).__name__ for b in answer.blocks] == ["OutputThinking", "OutputText", "OutputToolUse"]
    thinking, text, use = answer.blocks
    assert thinking.thinking == "Paris is a city." and text.text.strip() == "Let me check."
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    assert answer.called_tools
    # the events rebuild the same blocks, the way the SDK's accumulator does
    rebuilt, args = [], {}
    for e in events:
        kind = type(e).__name__
        if kind == "ContentBlockStart":
            assert e.index == len(rebuilt)
            rebuilt.append(msgspec.to_builtins(e.content_block))
        elif kind == "ContentBlockDelta":
            d = msgspec.to_builtins(e.delta)
            if d["type"] == "input_json_delta":
                args[e.index] = args.get(e.index, "") + d["partial_json"]
            elif d["type"] in ("text_delta", "thinking_delta"):
                field = d["type"].removesuffix("_delta")
                rebuilt[e.index][field] += d[field]
    for index, text_json in args.items():
        rebuilt[index]["input"] = json.loads(text_json)
    assert rebuilt == msgspec.to_builtins(answer.blocks)
    assert [type(e).__name__ for e in events].count("ContentBlockStop") == 3


def test_thinking_is_dropped_unless_asked_for():
    answer = answer_blocks(show_thinking=False)
    answer.feed(THOUGHT_CALL)
    answer.finish()
    assert [type(b).__name__ for b in answer.blocks] == ["OutputText", "OutputToolUse"]


def test_engine_errors_map_to_anthropic_statuses():
    r = on_localserve_error(None, EngineOverloadedError("full", retry_after=3))
    assert r.status_code == 529 and r.headers["Retry-After"] == "3"
    assert msgspec.to_builtins(r.content) == {"type": "error", "error": {"type": "overloaded_error", "message": "full"}}
    assert on_http_error(None, HTTPException(status_code=413)).content.error.type == "request_too_large"
    assert on_localserve_error(None, ContextOverflowError(10, 5)).content.error.type == "invalid_request_error"
    assert on_unexpected_error(None, RuntimeError("x")).content.error.type == "api_error"
