"""Structured output through the OpenAI SDK against a real server: response_format json_schema
for 20+ schemas (every answer parses and validates), json_object, and the constraint names
vLLM and SGLang accept; invalid constraints are 400s; sampled answers that max_tokens would cut
close within it, through each API."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.engine.grammar_schemas import SCHEMAS

pytestmark = pytest.mark.slow
jsonschema = pytest.importorskip("jsonschema")

MODEL = "gemma3:270m"


def ask(client, prompt: str, max_tokens: int = 80, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def test_json_schemas_always_validate(client):
    assert len(SCHEMAS) >= 20

    def one(item):
        name, schema = item
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        res = ask(client, f"Give an example {name.replace('_', ' ')} as JSON.", max_tokens=80, response_format=fmt)
        return name, schema, res.choices[0]

    with ThreadPoolExecutor(4) as pool:  # the session server runs 4 sequences at most
        results = list(pool.map(one, SCHEMAS.items()))
    for name, schema, choice in results:
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_streaming(client):
    # 16 tokens: where the model has not closed the object by then, its grammar does
    whole = ask(client, "Describe a cat in JSON.", max_tokens=16, response_format={"type": "json_object"})
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    assert whole.usage.completion_tokens <= 16
    schema = SCHEMAS["flat_person"]
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    whole = ask(client, "A person as JSON.", max_tokens=40, response_format=fmt).choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A person as JSON."}],
                                            max_tokens=40, temperature=0, response_format=fmt, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), schema)


def test_vllm_and_sglang_constraint_names(client):
    schema = SCHEMAS["enum_color"]
    cases = [
        ({"guided_json": schema}, lambda t: jsonschema.validate(json.loads(t), schema)),
        ({"json_schema": json.dumps(schema)}, lambda t: jsonschema.validate(json.loads(t), schema)),
        ({"structured_outputs": {"json": schema}}, lambda t: jsonschema.validate(json.loads(t), schema)),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
        ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-" and t[:3].isdigit()),
        ({"regex": "(cat|dog)s?"}, lambda t: t.rstrip("s") in ("cat", "dog")),
        ({"guided_grammar": 'root ::= "A" [0-9] [0-9]'}, lambda t: len(t) == 3 and t[0] == "A" and t[1:].isdigit()),
        ({"ebnf": 'root ::= ("x" | "y") "!"'}, lambda t: t in ("x!", "y!")),
        ({"structured_outputs": {"grammar": 'root ::= "ok"'}}, lambda t: t == "ok"),
    ]
    for extra, check in cases:
        text = ask(client, "Answer.", max_tokens=40, extra_body=extra).choices[0].message.content
        assert check(text) is not False, (extra, text)
    completion = client.completions.create(model=MODEL, prompt="The color:", max_tokens=40, temperature=0,
                                           extra_body={"response_format": {"type": "json_schema",
                                                                           "json_schema": {"schema": schema}}})
    jsonschema.validate(json.loads(completion.choices[0].text), schema)
    stream = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=5, temperature=0, stream=True,
                                       extra_body={"guided_choice": ["alpha", "beta"]})
    assert "".join(c.choices[0].text for c in stream if c.choices) in ("alpha", "beta")


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}}, ["json schema", "strng"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, ["json_schema.schema"]),
    ({"response_format": {"type": "yaml"}}, ["response_format.type"]),
    ({"guided_regex": "(unclosed"}, ["regex"]),
    ({"guided_regex": "(unclosed", "stream": True}, ["regex"]),
    ({"guided_grammar": "root ::= undefined_rule"}, ["grammar"]),
    ({"guided_choice": []}, ["choice"]),
    ({"guided_json": {"type": "object"}, "regex": "a+"}, ["guided_json", "regex"]),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, ["structured_outputs"]),
]


@pytest.mark.parametrize("extra,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_invalid_constraints_are_400(server, extra, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    for w in words:
        assert w.lower() in err["message"].lower(), err["message"]
    r = httpx.post(server.base_url + "/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, **extra},
                   timeout=60)
    assert r.status_code == 400, r.text


# a population written as digits until max_tokens (issue 14): integers, numbers and strings
# without bounds, free-form objects
COUNTRY = {"type": "object", "properties": {
    "country": {"type": "string"}, "population": {"type": "integer"}, "area_km2": {"type": "number"},
    "cities": {"type": "array", "items": {"type": "string"}}, "facts": {"type": "object"}},
    "required": ["country", "population", "area_km2", "cities", "facts"]}
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}, "max_results": {"type": "integer"},
                                           "site": {"type": "string"}}, "required": ["query", "max_results"]}
TOOL = {"type": "function", "function": {"name": "web_search", "description": "Search the web", "parameters": SEARCH}}


def test_sampled_outputs_close_within_a_small_budget(client, server):
    """At max_tokens 32 with sampling on, JSON outputs and forced tool calls parse and
    validate, through each API; nothing of a forced call leaks into content."""
    budget = 32
    msgs = [{"role": "user", "content": "Describe Thailand as JSON, with all the facts you know."}]
    ask_tool = [{"role": "user", "content": "Find recent news about the Mekong river, all of it."}]
    url = server.url

    def chat_json(seed, schema):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        res = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=budget, temperature=1.0,
                                             seed=seed, response_format=fmt)
        assert res.usage.completion_tokens <= budget
        jsonschema.validate(json.loads(res.choices[0].message.content), schema)
        return res.choices[0].finish_reason

    def chat_tool(seed, choice):
        res = client.chat.completions.create(model=MODEL, messages=ask_tool, max_tokens=budget, temperature=1.0,
                                             seed=seed, tools=[TOOL], tool_choice=choice)
        msg = res.choices[0].message
        assert msg.content is None and msg.tool_calls, msg
        for call in msg.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SEARCH)
        return res.choices[0].finish_reason

    def anthropic_tool(seed):
        body = {"model": MODEL, "max_tokens": budget, "temperature": 1.0, "messages": ask_tool,
                "tools": [{"name": "web_search", "input_schema": SEARCH}], "tool_choice": {"type": "any"}}
        res = httpx.post(url + "/v1/messages", json=body, timeout=120).json()
        assert [b["type"] for b in res["content"]] == ["tool_use"] * len(res["content"]) and res["content"], res
        for block in res["content"]:
            jsonschema.validate(block["input"], SEARCH)
        return res["stop_reason"]

    def anthropic_json(seed):
        body = {"model": MODEL, "max_tokens": budget, "temperature": 1.0, "messages": msgs,
                "output_config": {"format": {"type": "json_schema", "schema": COUNTRY}}}
        res = httpx.post(url + "/v1/messages", json=body, timeout=120).json()
        jsonschema.validate(json.loads("".join(b["text"] for b in res["content"] if b["type"] == "text")), COUNTRY)
        return res["stop_reason"]

    def responses_json(seed):
        body = {"model": MODEL, "input": msgs[0]["content"], "max_output_tokens": budget, "temperature": 1.0,
                "text": {"format": {"type": "json_schema", "name": "country", "schema": COUNTRY}}}
        res = httpx.post(url + "/v1/responses", json=body, timeout=120).json()
        (item,) = res["output"]
        jsonschema.validate(json.loads(item["content"][0]["text"]), COUNTRY)
        return res["status"]

    def responses_tool(seed):
        body = {"model": MODEL, "input": ask_tool[0]["content"], "max_output_tokens": budget, "temperature": 1.0,
                "tools": [{"type": "function", "name": "web_search", "parameters": SEARCH}], "tool_choice": "required"}
        res = httpx.post(url + "/v1/responses", json=body, timeout=120).json()
        assert res["output"] and all(o["type"] == "function_call" for o in res["output"]), res
        for o in res["output"]:
            jsonschema.validate(json.loads(o["arguments"]), SEARCH)
        return res["status"]

    jobs = [lambda: chat_json(1, COUNTRY), lambda: chat_json(2, COUNTRY), lambda: chat_json(3, SCHEMAS["mixed_required"]),
            lambda: chat_tool(4, "required"), lambda: chat_tool(5, {"type": "function", "function": {"name": "web_search"}}),
            lambda: anthropic_tool(6), lambda: anthropic_json(7), lambda: responses_json(8), lambda: responses_tool(9)]
    with ThreadPoolExecutor(4) as pool:
        ends = list(pool.map(lambda job: job(), jobs))
    # the budget, not the model, ended most of them: closing is what made them parse
    assert sum(e in ("length", "max_tokens", "incomplete") for e in ends) >= 3, ends
