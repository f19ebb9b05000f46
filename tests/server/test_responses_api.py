"""POST /v1/responses (the stateless Responses API subset Codex uses) of a real `localserve up`
process, through the `openai` SDK; and the request adapter and output assembler on their own
(the real parsers and the SDK's own stream accumulator, no server)."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import pytest

from localserve.errors import InvalidRequestError
from localserve.server.reasoning import ReasoningParser
from localserve.server.responses_adapter import chat_input, sampling_params
from localserve.server.responses_output import OutputItems, items_of
from localserve.server.responses_protocol import Completed, Created, ResponsesRequest
from localserve.server.responses_routes import Echo
from localserve.server.tools import GENERIC, OutputParser, ToolCallParser

openai = pytest.importorskip("openai")

MODEL = "gemma3:270m"
FRUITS = "Write a list of five fruits."
WEATHER = [{"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                           "additionalProperties": False},
            "strict": True}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}


def status_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


# -- through the SDK against a real server -------------------------------------------------------


@pytest.mark.slow
def test_text_answer_whole_and_streamed_agree(client):
    whole = client.responses.create(model=MODEL, input=FRUITS, max_output_tokens=10, temperature=0)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.model == MODEL
    assert whole.output_text and [o.type for o in whole.output] == ["message"]
    msg = whole.output[0]
    assert msg.id.startswith("msg_") and msg.role == "assistant" and msg.content[0].annotations == []
    u = whole.usage
    assert 0 < u.output_tokens <= 10 and u.input_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens
    assert 0 <= u.input_tokens_details.cached_tokens <= u.input_tokens and u.output_tokens_details.reasoning_tokens == 0
    assert whole.max_output_tokens == 10 and whole.temperature == 0 and whole.tools == []
    if whole.status == "incomplete":
        assert whole.incomplete_details.reason == "max_output_tokens" and msg.status == "incomplete"
    else:
        assert whole.status == "completed" and whole.incomplete_details is None

    events = list(client.responses.create(model=MODEL, input=FRUITS, max_output_tokens=10, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == whole.output_text == events[-4].text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == u.output_tokens
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"


@pytest.mark.slow
def test_stream_helper_reassembles_text(client):
    with client.responses.stream(model=MODEL, input=FRUITS, max_output_tokens=16, temperature=0) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    whole = client.responses.create(model=MODEL, input=FRUITS, max_output_tokens=16, temperature=0)
    assert deltas == whole.output_text


@pytest.mark.slow
def test_required_function_call_whole_and_streamed(client):
    kw = dict(model=MODEL, input="What is the weather in Paris?", tools=WEATHER, tool_choice="required",
              parallel_tool_calls=False, max_output_tokens=40, temperature=0)
    whole = client.responses.create(**kw)
    assert whole.status == "completed" and [o.type for o in whole.output] == ["function_call"]
    call = whole.output[0]
    assert call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    args = json.loads(call.arguments)
    jsonschema.validate(args, WEATHER[0]["parameters"])
    assert whole.tool_choice == "required" and whole.tools[0].name == "get_weather"

    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done[0].arguments == whole.output[0].arguments  # greedy: the same call
    assert final.output[0].arguments == call.arguments and final.output[0].parsed_arguments == args


@pytest.mark.slow
def test_named_function_and_round_trip_with_output(client):
    forced = client.responses.create(model=MODEL, input="Weather in Rome?", tools=WEATHER,
                                     tool_choice={"type": "function", "name": "get_weather"},
                                     parallel_tool_calls=False, max_output_tokens=40, temperature=0)
    (call,) = forced.output
    assert call.type == "function_call" and call.name == "get_weather"
    history = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Rome?"}]},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 22 C"}]
    answer = client.responses.create(model=MODEL, input=history, instructions="Answer in one sentence.",
                                     tools=WEATHER, tool_choice="none", max_output_tokens=8, temperature=0)
    assert answer.status in ("completed", "incomplete") and [o.type for o in answer.output] == ["message"]
    assert answer.instructions == "Answer in one sentence." and answer.tool_choice == "none"
    # the tool's output is in the prompt: the conversation without it is shorter
    shorter = client.responses.create(model=MODEL, input=history[:1], instructions="Answer in one sentence.",
                                      max_output_tokens=1, temperature=0)
    assert answer.usage.input_tokens > shorter.usage.input_tokens + 10


@pytest.mark.slow
def test_json_schema_format_validates(client):
    r = client.responses.create(model=MODEL, input="Describe a person as JSON.", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                 "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    assert r.text.format.type == "json_schema" and r.text.format.name == "person"
    obj = client.responses.create(model=MODEL, input="Give me a JSON object.", max_output_tokens=30, temperature=0,
                                  text={"format": {"type": "json_object"}})
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


@pytest.mark.slow
def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(model=MODEL, input=FRUITS, max_output_tokens=2, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[0].status == "incomplete"
    events = list(client.responses.create(model=MODEL, input=FRUITS, max_output_tokens=2, temperature=0, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.slow
def test_bad_requests_are_openai_shaped_errors(client):
    def create(**kw):
        return lambda: client.responses.create(**{"model": MODEL, "input": "hi", "max_output_tokens": 2, **kw})

    status, body = status_of(create(previous_response_id="resp_abc"))
    assert status == 400 and "stateless" in body["message"] and body["type"] == "invalid_request_error"
    status, body = status_of(create(model="no-such-model"))
    assert status == 404 and body["code"] == "model_not_found"
    status, body = status_of(create(input=[]))
    assert status == 400 and "input" in body["message"]
    status, body = status_of(create(tools=[{"type": "function", "name": "bad name!"}]))
    assert status == 400 and "tools[0]" in body["message"]
    wat = {"type": "object", "properties": {"a": {"type": "wat"}}}
    status, body = status_of(create(text={"format": {"type": "json_schema", "name": "x", "schema": wat}}))
    assert status == 400 and "wat" in body["message"]
    status, body = status_of(create(tools=WEATHER, tool_choice={"type": "function", "name": "nope"}))
    assert status == 400 and "nope" in body["message"]
    status, body = status_of(create(stream=True, previous_response_id="resp_abc"))
    assert status == 400


@pytest.mark.slow
def test_a_codex_shaped_turn_streams(client):
    """What the Codex CLI sends with store=false: instructions, developer and user messages, a
    replayed reasoning item and call history, fields this server only accepts."""
    shell = {"type": "function", "name": "shell", "description": "Runs a shell command", "strict": False,
             "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                            "required": ["command"]}}
    history = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox: read-only."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": '{"command": ["ls"]}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "README.md\nsrc"},
    ]
    events = list(client.responses.create(
        model=MODEL, instructions="You are a coding agent.", input=history, tools=[shell], tool_choice="auto",
        parallel_tool_calls=False, reasoning={"effort": "medium", "summary": "auto"}, store=False, stream=True,
        include=["reasoning.encrypted_content"], prompt_cache_key="session-1", max_output_tokens=8, temperature=0))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    final = events[-1].response
    assert final.output and final.usage.input_tokens > 20 and final.store is False
    assert [e.item.id for e in events if e.type == "response.output_item.done"] == [o.id for o in final.output]

# -- the adapter on its own ----------------------------------------------------------------------------


def request(**kw) -> ResponsesRequest:
    return msgspec.convert({"model": MODEL, **kw}, ResponsesRequest)


def test_input_items_become_chat_messages():
    chat = chat_input(request(instructions="Be brief.", tools=WEATHER, parallel_tool_calls=False, input=[
        {"type": "message", "role": "developer", "content": "Use tools."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                     {"type": "input_text", "text": "Rome?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Milan"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "Rain"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny in Rome."}]},
        {"role": "developer", "content": "Stay polite."},
        {"role": "user", "content": "Thanks"},
    ]))
    assert chat.messages == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Milan"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "Rain"},
        {"role": "assistant", "content": "Sunny in Rome."},
        # a later developer message keeps its place: the prompt before it stays as it was
        {"role": "system", "content": "Stay polite."},
        {"role": "user", "content": "Thanks"},
    ]
    assert [t.name for t in chat.tools] == ["get_weather"] and chat.choice.mode == "auto" and not chat.parallel
    assert chat_input(request(input="hi")).messages == [{"role": "user", "content": "hi"}]
    assert chat_input(request(input="hi")).choice.mode == "none"


@pytest.mark.parametrize("kw, words", [
    ({"input": None}, "input"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "stateless"),
    ({"input": "hi", "conversation": "conv_1"}, "stateless"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "stateless"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "call_id"),
    ({"input": "hi", "tools": [{"type": "namespace", "name": "ns"}]}, "tools[0].tools"),
    ({"input": "hi", "tools": [{"type": "namespace", "name": "a.b", "tools": []}]}, "tools[0].name"),
    ({"input": [{"content": "no type, no role"}]}, "input[0].type"),
    ({"input": "hi", "tools": [{"type": "function", "name": "bad name!"}]}, "tools[0]"),
    ({"input": "hi", "tools": WEATHER + WEATHER}, "unique"),
    ({"input": "hi", "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": [{"role": "system", "content": "x"}]}, "besides system"),
])
def test_bad_input_says_what_is_wrong(kw, words):
    with pytest.raises(InvalidRequestError) as info:
        chat_input(request(**kw))
    assert words in str(info.value)


def test_sampling_fields():
    p = sampling_params(request(input="x", max_output_tokens=7, temperature=0.3, top_p=0.9,
                                text={"format": {"type": "json_schema", "name": "p", "schema": PERSON}}))
    assert (p.max_tokens, p.temperature, p.top_p) == (7, 0.3, 0.9) and p.guided.json_schema == PERSON
    assert sampling_params(request(input="x", text={"format": {"type": "json_object"}})).guided.json_object
    assert sampling_params(request(input="x", text={"format": {"type": "text"}})).guided is None
    for bad in ({"max_output_tokens": 0}, {"temperature": 3}, {"top_p": 0},
                {"text": {"format": {"type": "json_schema", "name": "p"}}}, {"text": {"format": {"type": "xml"}}}):
        with pytest.raises(InvalidRequestError):
            sampling_params(request(input="x", **bad))


# -- output items from output text (the real parsers, and the SDK's own accumulator) -------------------

THOUGHT_CALL = ('<think>Paris is a city.</think>Let me check. ```tool_call\n'
                '{"name": "get_weather", "arguments": {"city": "Paris"}}\n```')


def accumulate(events: list) -> object:
    """The events as the openai SDK's stream helper reads them; returns its final response."""
    from openai._models import construct_type
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent
    from openai._types import omit

    state = ResponseStreamState(input_tools=WEATHER, text_format=omit)
    for i, e in enumerate(events):
        e.sequence_number = i
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=msgspec.to_builtins(e)))
    return state._completed_response


@pytest.mark.parametrize("size", [1, 3, 7, len(THOUGHT_CALL)])
def test_items_do_not_depend_on_how_the_text_arrives(size):
    items = OutputItems(OutputParser(ReasoningParser(), ToolCallParser(GENERIC, ["get_weather"])))
    echo = Echo("resp_1", 0, request(input="x", tools=WEATHER), MODEL)
    events = [Created(response=echo.response("in_progress"))]
    for i in range(0, len(THOUGHT_CALL), size):
        events += items.feed(THOUGHT_CALL[i:i + size])
    events += items.finish(truncated=False)
    assert [type(it).__name__ for it in items.items] == ["ReasoningItem", "MessageItem", "FunctionCallItem"]
    thought, message, call = items.items
    assert thought.content[0].text == "Paris is a city." and items.reasoning == "Paris is a city."
    assert message.content[0].text.strip() == "Let me check." and message.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.status == "completed"
    final = accumulate(events + [Completed(response=echo.response("completed", items))])
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text.strip() == "Let me check." and final.output[2].parsed_arguments == {"city": "Paris"}
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("ItemAdded") == kinds.count("ItemDone") == 3
    assert kinds.count("PartAdded") == kinds.count("PartDone") == 2


def test_a_cut_off_call_is_incomplete():
    items = OutputItems(OutputParser(None, ToolCallParser(GENERIC, ["get_weather"])))
    items.feed(THOUGHT_CALL.split("</think>")[1][:-12])
    items.finish(truncated=True)
    assert [type(it).__name__ for it in items.items] == ["MessageItem", "FunctionCallItem"]
    assert items.items[-1].status == "incomplete" and items.items[0].status == "completed"


def test_whole_answers_read_as_chat_completions_do():
    parser = OutputParser(ReasoningParser(), ToolCallParser(GENERIC, ["get_weather"]))
    items = items_of(parser.parse(THOUGHT_CALL), truncated=False)
    assert [type(it).__name__ for it in items] == ["ReasoningItem", "MessageItem", "FunctionCallItem"]
    assert json.loads(items[2].arguments) == {"city": "Paris"} and items[2].call_id.startswith("call_")
    # a call cut off with none complete: the whole text is the (incomplete) message
    cut = THOUGHT_CALL.split("</think>")[1][:-12]
    items = items_of(OutputParser(None, ToolCallParser(GENERIC, ["get_weather"])).parse(cut), truncated=True)
    assert [type(it).__name__ for it in items] == ["MessageItem"]
    assert items[0].content[0].text == cut and items[0].status == "incomplete"


def test_an_error_mid_stream_is_an_error_event_then_failed():
    import asyncio

    from localserve.engine.outputs import SeqDelta
    from localserve.errors import EngineOverloadedError
    from localserve.server.responses_routes import _events

    async def engine():  # the engine's deltas after the first, then a failure
        yield SeqDelta("r", 0, [1], " world")
        raise EngineOverloadedError("the engine went away", retry_after=1)

    async def collect() -> list[bytes]:
        items = OutputItems(OutputParser())
        echo = Echo("resp_1", 0, request(input="x"), MODEL)
        return [chunk async for chunk in _events(SeqDelta("r", 0, [0], "Hello"), engine(), items, echo, None)]

    chunks = asyncio.run(collect())
    lines = [c.decode().split("\n") for c in chunks]
    assert all(ev.startswith("event: ") and data.startswith("data: ") for ev, data, *_ in lines)
    payloads = [json.loads(data[6:]) for _, data, *_ in lines]
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert [p["type"] for p in payloads][-2:] == ["error", "response.failed"]
    assert payloads[-2]["message"] == "the engine went away" and payloads[-2]["code"]
    failed = payloads[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "the engine went away"
    assert "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta") == "Hello world"
