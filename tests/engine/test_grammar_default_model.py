"""Grammar-constrained decoding on the embedded default model (Gemma 3 270M, 262k vocabulary):
every JSON schema's output parses and validates, regex and choice hold, and constrained rows
leave the unconstrained rows of their batch exactly as they are alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from localserve.engine.backend import BackendConfig
from localserve.engine.guided import GuidedDecoding
from localserve.engine.llm_engine import EngineConfig
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import InvalidRequestError
from tests.engine.grammar_schemas import SCHEMAS
from tests.engine.grammar_toy import toy_engine

pytestmark = pytest.mark.slow
SAMPLED = ["flat_person", "nested_address", "array_of_objects", "any_of_objects", "bounded_number",
           "tool_call_like", "nullable_anyof", "mixed_required"]


@pytest.fixture(scope="module")
def model(default_gguf):
    from localserve.runtime.loader import load_model

    return load_model(
        None,
        backend="cpu",
        backend_cfg=BackendConfig(num_threads=2),
        engine_cfg=EngineConfig(num_blocks=2048, max_num_batched_tokens=1024),
    )


def chat(tok, text: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": text}])


def schema_prompt(tok, name: str) -> list[int]:
    return chat(tok, f"Write one example of a {name.replace('_', ' ')} as JSON.")


def check_schemas(tok, names, reqs) -> None:
    for name, r in zip(names, reqs):
        text = tok.decode(r.output_token_ids)
        assert r.finish_reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_every_schema_validates_greedy(model):
    eng, tok = model.engine, model.tokenizer
    names = list(SCHEMAS)
    assert len(names) >= 20
    forced0 = eng.scheduler.num_forced_tokens
    params = [SamplingParams(max_tokens=160, temperature=0.0, guided=GuidedDecoding(json_schema=SCHEMAS[n])) for n in names]
    reqs = [s[0] for s in eng.generate([schema_prompt(tok, n) for n in names], params)]
    check_schemas(tok, names, reqs)
    # a strict schema forces its keys and punctuation: a good share comes from jump-forward
    total = sum(len(r.output_token_ids) for r in reqs)
    assert eng.scheduler.num_forced_tokens - forced0 > 0.2 * total


def test_schemas_validate_sampled(model):
    eng, tok = model.engine, model.tokenizer
    params = [SamplingParams(max_tokens=160, temperature=0.8, top_p=0.95, seed=i,
                             guided=GuidedDecoding(json_schema=SCHEMAS[n])) for i, n in enumerate(SAMPLED)]
    reqs = [s[0] for s in eng.generate([schema_prompt(tok, n) for n in SAMPLED], params)]
    check_schemas(tok, SAMPLED, reqs)


def test_json_object_regex_and_choice(model):
    eng, tok = model.engine, model.tokenizer
    params = [
        SamplingParams(max_tokens=120, temperature=0.0, guided=GuidedDecoding(json_object=True)),
        SamplingParams(max_tokens=30, temperature=0.0, guided=GuidedDecoding(regex=r"\d{3}-\d{4}")),
        SamplingParams(max_tokens=30, temperature=0.7, seed=3, guided=GuidedDecoding(choice=["Paris", "London", "Rome"])),
        SamplingParams(max_tokens=30, temperature=0.0, guided=GuidedDecoding(
            ebnf='root ::= "The answer is " ("yes" | "no") "."')),
    ]
    prompts = [
        chat(tok, "Give a JSON object with one key 'ok' set to true."),
        chat(tok, "Make up a phone number."),
        chat(tok, "What is the capital of France?"),
        chat(tok, "Is the sky blue?"),
    ]
    reqs = [s[0] for s in eng.generate(prompts, params)]
    texts = [tok.decode(r.output_token_ids) for r in reqs]
    assert reqs[0].finish_reason == "stop" and isinstance(json.loads(texts[0]), dict), texts[0]
    assert re.fullmatch(r"\d{3}-\d{4}", texts[1]), texts[1]
    assert texts[2] in ("Paris", "London", "Rome")
    assert re.fullmatch(r"The answer is (yes|no)\.", texts[3]), texts[3]
    assert all(r.finish_reason == "stop" for r in reqs)


def test_constrained_rows_leave_unconstrained_rows_alone(model):
    """Free rows (one greedy, one sampled at temperature 0.9) batched with constrained ones, whose
    jump-forward reshapes the batch, come out token for token as they do alone: a mask never
    leaks into a row that has none, and a row's logits do not depend on its batch."""
    eng, tok = model.engine, model.tokenizer
    free = [SamplingParams(max_tokens=24, temperature=0.0),
            SamplingParams(max_tokens=24, temperature=0.9, seed=42)]
    free_prompts = [chat(tok, "Name three fruits."), chat(tok, "Write a haiku about rain.")]
    alone = [eng.generate([p], sp)[0][0].output_token_ids for p, sp in zip(free_prompts, free)]
    names = ["tool_call_like", "array_of_ints", "enum_color"]
    params = [SamplingParams(max_tokens=160, temperature=0.0, guided=GuidedDecoding(json_schema=SCHEMAS[n])) for n in names]
    prompts = [schema_prompt(tok, names[0]), free_prompts[0], schema_prompt(tok, names[1]),
               free_prompts[1], schema_prompt(tok, names[2])]
    reqs = [s[0] for s in eng.generate(prompts, [params[0], free[0], params[1], free[1], params[2]])]
    assert [reqs[1].output_token_ids, reqs[3].output_token_ids] == alone
    check_schemas(tok, names, [reqs[0], reqs[2], reqs[4]])
    eng.check_integrity()


def test_invalid_constraints_are_400s(model):
    eng, tok = model.engine, model.tokenizer
    for guided in (GuidedDecoding(json_schema={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
                   GuidedDecoding(regex="[a-"),
                   GuidedDecoding(ebnf="root ::= ")):
        with pytest.raises(InvalidRequestError) as e:
            eng.add_request(chat(tok, "hi"), SamplingParams(max_tokens=4, guided=guided))
        assert e.value.status == 400


def test_every_schema_validates_under_random_logits_on_the_262k_vocab(model):
    """The grammar, not the model, keeps the output valid: random logits over Gemma's whole
    vocabulary (byte pieces, multi-character pieces, special tokens) sampled through the mask."""
    tok = model.tokenizer
    eng = toy_engine(tok, vocab_size=model.config.vocab_size)
    names = list(SCHEMAS)
    params = [SamplingParams(max_tokens=300, temperature=1.0, seed=i, guided=GuidedDecoding(json_schema=SCHEMAS[n]))
              for i, n in enumerate(names)]
    reqs = [s[0] for s in eng.generate([chat(tok, n) for n in names], params)]
    check_schemas(tok, names, reqs)
    assert not any(set(r.output_token_ids) & tok.special_token_ids for r in reqs)
