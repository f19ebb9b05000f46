"""Structured output through the OpenAI SDK against a real server: response_format json_schema
for 20+ schemas (every answer parses and validates), json_object, and the constraint names
vLLM and SGLang accept; invalid constraints are 400s."""

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
    whole = ask(client, "Describe a cat in JSON.", max_tokens=16, response_format={"type": "json_object"})
    text = whole.choices[0].message.content
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
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
