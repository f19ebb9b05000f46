"""Constrained outputs close within max_tokens (GrammarState.close_within, grammar_close) and the
grammars bound digit and whitespace runs (schema_bounds), on tiny real tokenizers and the toy
model whose random logits loop inside strings until the budget runs out."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from localserve.engine.grammar import tokenizer_grammar
from localserve.engine.grammar_close import completion
from localserve.engine.guided import GuidedDecoding
from localserve.engine.sampling_params import SamplingParams
from localserve.engine.schema_bounds import MAX_WHITESPACE, NUMBER_LIMIT, bounded_schema
from localserve.server.tools.formats import GENERIC, HERMES
from localserve.server.tools.grammar import call_schema, forced_calls_ebnf
from localserve.server.tools.parser import ToolCallParser
from localserve.server.tools.spec import ToolSpec
from tests.engine.grammar_schemas import SCHEMAS
from tests.engine.grammar_toy import toy_engine
from tests.engine.test_grammar import prompt_of, text_of, tok  # noqa: F401 (the tokenizer fixture)

# free-form parts: strings without limits, integers and numbers without bounds, any object
FREE = {
    "type": "object",
    "properties": {"country": {"type": "string"}, "population": {"type": "integer"},
                   "area": {"type": "number"}, "cities": {"type": "array", "items": {"type": "string"}},
                   "facts": {"type": "object"}, "motto": {"type": "string", "maxLength": 40}},
    "required": ["country", "population", "area", "cities", "facts"],
}
BUDGET_SCHEMAS = {**SCHEMAS, "free_form": FREE}
TOOLS = [ToolSpec("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"},
                                                                        "days": {"type": "integer"}},
                                      "required": ["city", "days"]}),
         ToolSpec("search", "", {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})]


def specs() -> dict[str, GuidedDecoding]:
    out = {name: GuidedDecoding(json_schema=s) for name, s in BUDGET_SCHEMAS.items()}
    out["json_object"] = GuidedDecoding(json_object=True)
    out["tools_generic"] = GuidedDecoding(ebnf=forced_calls_ebnf(TOOLS, GENERIC, parallel=True))
    out["tools_hermes"] = GuidedDecoding(ebnf=forced_calls_ebnf(TOOLS[:1], HERMES, parallel=False))
    return out


def check(name: str, text: str) -> None:
    """The output parses (and validates where there is a schema)."""
    if name.startswith("tools_"):
        fmt = GENERIC if name == "tools_generic" else HERMES
        content, calls = ToolCallParser(fmt, [t.name for t in TOOLS], forced=True).parse(text)
        assert calls and not content, text
        params = {t.name: t.parameters for t in TOOLS}
        for c in calls:
            jsonschema.validate(json.loads(c.arguments), params[c.name])
        return
    value = json.loads(text)
    if name == "json_object":
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, BUDGET_SCHEMAS[name])


def min_tokens(tok, spec) -> int:
    """The tokens the grammar's completion from its start takes (its shortest document, or
    about: the walk is greedy)."""
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    state = tg.new_state(tg.compile(spec))
    return len(state._spell_all(completion(state.matcher)))


# ----------------------------------------------------------------------------- the bounds


def test_bounded_schema_bounds_numbers_and_free_values_and_keeps_the_rest():
    b = bounded_schema(FREE)
    props = b["properties"]
    assert props["population"] == {"type": "integer", "minimum": -NUMBER_LIMIT, "maximum": NUMBER_LIMIT}
    assert props["area"]["maximum"] == NUMBER_LIMIT
    assert props["cities"] == FREE["properties"]["cities"]  # strings stay unbounded
    assert props["facts"]["additionalProperties"] == {"$ref": "#/$defs/localserve_json_value"}
    assert "localserve_json_value" in b["$defs"] and props["motto"]["pattern"].endswith("{0,40}$")
    # a side the schema bounds stays as it is; enums, consts and bounded strings are not touched
    assert bounded_schema({"type": "integer", "minimum": 5})["maximum"] == NUMBER_LIMIT
    assert "minimum" not in bounded_schema({"type": "integer", "exclusiveMinimum": 5})
    assert bounded_schema({"enum": [1, 2]}) == {"enum": [1, 2]}
    assert bounded_schema(SCHEMAS["enum_color"]) == SCHEMAS["enum_color"]
    assert bounded_schema(False) is False
    assert bounded_schema(True)["$ref"] == "#/$defs/localserve_json_value"
    # the parameters' own definitions move to the root of a tool call's schema
    tool = ToolSpec("f", "", {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
                              "$defs": {"P": {"type": "integer"}}})
    s = call_schema(tool, "arguments")
    assert s["$defs"]["P"]["maximum"] == NUMBER_LIMIT and "$defs" not in s["properties"]["arguments"]
    jsonschema.validate({"name": "f", "arguments": {"p": 3}}, s)


@pytest.mark.parametrize("spec, good, bad", [
    (GuidedDecoding(json_schema=FREE), '{"country": "a", "population": 999999999999999, "area": 1.5, '
                                       '"cities": [], "facts": {"n": 123456789012345}}',
     '{"country": "a", "population": 12345678901234567'),
    (GuidedDecoding(json_object=True), '{"a": [1, 2.25, {"b": -1000000000000000}]}', '{"a": 12345678901234567'),
    (GuidedDecoding(json_object=True, any_whitespace=True), '{\n' + " " * (MAX_WHITESPACE - 1) + '"a": 1}',
     "{" + " " * (MAX_WHITESPACE + 1)),
    (GuidedDecoding(ebnf=forced_calls_ebnf(TOOLS, GENERIC, parallel=False)),
     '```tool_call\n{"name": "get_weather", "arguments": {"city": "x", "days": 3}}\n```',
     '```tool_call\n{"name": "get_weather", "arguments": {"city": "x", "days": 99999999999999999'),
])
def test_grammars_bound_digit_and_whitespace_runs(tok, spec, good, bad):
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    compiled = tg.compile(spec)
    m = tg.new_state(compiled).matcher
    assert m.accept_string(good) and m.is_completed()
    assert not tg.new_state(compiled).matcher.accept_string(bad)


# ----------------------------------------------------------------------------- the completion


@pytest.mark.parametrize("name", list(specs()))
def test_completion_closes_from_any_point_of_a_document(tok, name):
    """From every prefix of a real document, the completion makes it parse, and the walk
    leaves the matcher as it was."""
    spec = specs()[name]
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    compiled = tg.compile(spec)
    # a document to cut: what the toy model writes with room to finish
    eng = toy_engine(tok)
    (r,) = [s[0] for s in eng.generate([prompt_of(tok, name)], SamplingParams(
        max_tokens=400, temperature=0.0, guided=spec))]
    doc = text_of(tok, r).encode()
    for cut in sorted({*range(0, len(doc), max(1, len(doc) // 25)), len(doc)}):
        state = tg.new_state(compiled)
        assert state.matcher.accept_string(doc[:cut])
        state.fill_bitmask()
        before = state.bitmask.copy()
        rest = completion(state.matcher)
        assert rest is not None, (name, doc[:cut])
        state.fill_bitmask()
        assert (state.bitmask == before).all()
        check(name, (doc[:cut] + rest).decode())


def test_completion_gets_out_of_patterns_and_split_characters(tok):
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    email = tg.compile(GuidedDecoding(regex=r"[a-z]+@[a-z]+\.com"))
    m = tg.new_state(email).matcher
    assert re.fullmatch(r"[a-z]+@[a-z]+\.com", completion(m).decode())
    m.accept_string("abc")
    assert re.fullmatch(r"[a-z]+@[a-z]+\.com", "abc" + completion(m).decode())
    # a loop whose way out comes late in the alphabet: the run of 'a' is broken off
    loop = tg.new_state(tg.compile(GuidedDecoding(regex="(a|b)+c"))).matcher
    assert re.fullmatch("(a|b)+c", completion(loop).decode())
    # inside a character cut by a token: the rest of it first
    obj = tg.new_state(tg.compile(GuidedDecoding(json_object=True))).matcher
    assert obj.accept_string(b'{"k": "\xe4')
    assert json.loads(b'{"k": "\xe4' + completion(obj))["k"][0] == "\u4000"


# ----------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_outputs_parse_at_any_budget_they_can_fit(tok, temperature):
    """The toy model writes random text inside strings and numbers; at every max_tokens the
    grammar's shortest document fits in, the output parses and validates, and never exceeds
    max_tokens. Outputs the budget closed end with finish_reason length."""
    all_specs = specs()
    need = {name: min_tokens(tok, s) for name, s in all_specs.items()}
    closed = 0
    for max_tokens in (12, 24, 40, 64):
        eng = toy_engine(tok)
        names = [n for n in all_specs if need[n] <= max_tokens]
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, guided=all_specs[n])
                  for i, n in enumerate(names)]
        reqs = [s[0] for s in eng.generate([prompt_of(tok, n) for n in names], params)]
        for name, r in zip(names, reqs):
            assert len(r.output_token_ids) <= max_tokens
            check(name, text_of(tok, r))
            assert r.finish_reason in ("stop", "length")
        closed += eng.scheduler.num_budget_closes
        assert eng.scheduler.num_budget_closes <= sum(r.finish_reason == "length" for r in reqs)
        eng.check_integrity()
    assert closed >= 5  # random text rarely closes a string: the budget had to


def test_close_within_replaces_the_token_that_leaves_no_room(tok):
    spec = GuidedDecoding(json_schema=SCHEMAS["flat_person"])
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    state = tg.new_state(tg.compile(spec))
    assert state.matcher.accept_string('{"name": "Al')
    closing = completion(state.matcher)
    need = len(state._spell_all(closing))
    a = state._spell_all(b"x")
    assert len(a) == 1 and state.accept(a[0])  # the model goes on writing the name
    # room for the completion after the token: nothing to do, nothing changed
    after = completion(state.matcher)
    assert state.close_within(a[0], len(state._spell_all(after))) is None
    assert completion(state.matcher) == after
    # no room after it: the completion from before it takes its place
    jump = state.close_within(a[0], need - 1)
    assert jump is not None and jump.num_replaced == 1 and len(jump.token_ids) <= need
    assert state.matcher.is_completed()
    jsonschema.validate(json.loads('{"name": "Al' + tok.decode(jump.token_ids)), SCHEMAS["flat_person"])


def test_a_complete_output_that_goes_on_ends_with_a_stop_token(tok):
    """'a' is a whole match; a model that goes on into the long optional tail with no room
    left is stopped at 'a' (finish_reason stop: the output was complete)."""
    eng = toy_engine(tok)
    long_tail = GuidedDecoding(regex="a(bcdefghijklmnopqrstuvwxyz)?")
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    state = tg.new_state(tg.compile(long_tail))
    a, b = state._spell_all(b"a")[0], state._spell_all(b"b")[0]
    assert state.accept(a) and state.close_within(a, 1) is None
    assert state.accept(b)
    jump = state.close_within(b, 1)
    assert jump.num_replaced == 1 and jump.token_ids[0] in tok.eos_token_ids and state.terminated
    # through the engine: whatever the model samples, the output is a whole match
    for seed in range(4):
        (r,) = [s[0] for s in eng.generate([prompt_of(tok)], SamplingParams(
            max_tokens=3, temperature=1.0, seed=seed, guided=long_tail))]
        assert re.fullmatch("a(bcdefghijklmnopqrstuvwxyz)?", text_of(tok, r))


def test_jump_forward_leaves_room_to_close(tok):
    """A long forced key after a string: the jump is taken only where the output can still
    close after it; every budget that fits the shortest document gives a valid one."""
    key = "a_rather_long_property_name_to_force"
    schema = {"type": "object", "properties": {"s": {"type": "string"}, key: {"type": "integer"}},
              "required": ["s", key], "additionalProperties": False}
    spec = GuidedDecoding(json_schema=schema)
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    state = tg.new_state(tg.compile(spec))
    assert state.matcher.accept_string('{"s": "x')
    quote = state._spell_all(b'"')[0]
    assert state.accept(quote)
    after = completion(state.matcher)  # ', "<key>": 0}'
    need_after = len(state._spell_all(after))
    # room for the forced key but not for the value after it: no jump, nothing changed
    assert state.jump_forward(quote, need_after - 1) is None
    assert completion(state.matcher) == after
    if state._spell(after.decode(), hold_back=False) is not None:  # a tokenizer jump-forward can spell with
        jump = state.jump_forward(quote, need_after)
        assert jump is not None and key in tok.decode(jump.token_ids)

    need = min_tokens(tok, spec)
    for max_tokens in range(need, need + 12):
        eng = toy_engine(tok)
        (r,) = [s[0] for s in eng.generate([prompt_of(tok)], SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=max_tokens, guided=spec))]
        assert len(r.output_token_ids) <= max_tokens
        jsonschema.validate(json.loads(text_of(tok, r)), schema)


def test_greedy_unconstrained_output_is_untouched(tok):
    free = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = [s[0] for s in toy_engine(tok).generate([prompt_of(tok, "a b")], free)]
    eng = toy_engine(tok)
    schema = SCHEMAS["optional_fields"]
    mixed = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, guided=GuidedDecoding(json_schema=schema))
             for s in range(3)] + [free]
    reqs = [s[0] for s in eng.generate([prompt_of(tok, f"x{i}") for i in range(3)] + [prompt_of(tok, "a b")], mixed)]
    assert reqs[3].output_token_ids == alone[0].output_token_ids
    for r in reqs[:3]:
        jsonschema.validate(json.loads(text_of(tok, r)), schema)
