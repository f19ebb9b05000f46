"""Grammar-constrained decoding on tiny real tokenizers (byte-fallback SentencePiece and
byte-level BPE) and a toy model whose random logits the real torch sampler masks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from localserve.backends.torch_common.sampling import apply_token_bitmask, sample, unpack_bitmask
from localserve.engine.grammar import TokenizerGrammar, bitmask_words, tokenizer_grammar
from localserve.engine.guided import GuidedDecoding
from localserve.engine.plan import SamplingRow
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import InvalidRequestError
from localserve.models.tokenizer import Tokenizer
from tests.engine.grammar_schemas import SCHEMAS
from tests.engine.grammar_toy import toy_engine
from tests.models.tokenizer_builders import write_byte_level_gguf, write_sentencepiece_gguf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level"])
def tok(request, tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp(f"tok_{request.param}")
    write = write_sentencepiece_gguf if request.param == "sentencepiece" else write_byte_level_gguf
    return Tokenizer.from_gguf(write(d / "t.gguf"), cache_dir=d / "cache")


def prompt_of(tok: Tokenizer, text: str = "Reply in JSON:") -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def run(eng, tok, params, prompts=None):
    prompts = prompts or [prompt_of(tok)]
    return [seqs[0] for seqs in eng.generate(prompts, params)]


def text_of(tok, req) -> str:
    return tok.decode(req.output_token_ids)


# ----------------------------------------------------------------------------- the spec


def test_guided_spec_needs_exactly_one_well_formed_constraint():
    assert GuidedDecoding(json_schema='{"type": "object"}').kind == "json_schema"
    assert GuidedDecoding(json_object=True).kind == "json_object"
    assert GuidedDecoding(choice=["a", "b"]).kind == "choice"
    for kw, msg in [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "regex, choice"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": "[1, 2]"}, "must be a JSON object"),
        ({"choice": []}, "at least one"),
        ({"choice": ["a", 1]}, "list of strings"),
        ({"ebnf": "  "}, "non-empty"),
    ]:
        with pytest.raises(InvalidRequestError, match=re.escape(msg)):
            GuidedDecoding(**kw)
    sp = SamplingParams(guided=GuidedDecoding(regex="[0-9]+"))
    assert sp.guided.regex == "[0-9]+"
    with pytest.raises(InvalidRequestError, match="GuidedDecoding"):
        SamplingParams(guided={"regex": "a"})
    a = GuidedDecoding(json_schema={"type": "object", "required": []})
    b = GuidedDecoding(json_schema='{"required": [], "type": "object"}')
    assert a.cache_key() == b.cache_key()


def test_grammar_module_imports_neither_torch_nor_xgrammar_until_used():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import localserve.engine.grammar, localserve.engine.llm_engine\n"
        "assert 'xgrammar' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "guided, msg",
    [
        (GuidedDecoding(json_schema={"type": "objectx"}), 'invalid JSON schema: Unsupported type "objectx"'),
        (GuidedDecoding(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), "invalid JSON schema"),
        (GuidedDecoding(regex="(abc"), "invalid regex: Regex parsing error"),
        (GuidedDecoding(ebnf="root ::= foo"), 'invalid EBNF grammar: EBNF parser error at line 1, column 10: Rule "foo"'),
    ],
)
def test_uncompilable_constraints_are_invalid_requests(tok, guided, msg):
    eng = toy_engine(tok)
    with pytest.raises(InvalidRequestError, match=re.escape(msg)) as e:
        eng.add_request(prompt_of(tok), SamplingParams(max_tokens=4, guided=guided))
    assert e.value.status == 400 and "/project/" not in str(e.value)
    assert not eng.has_unfinished()


def test_engine_without_tokenizer_rejects_constraints():
    from tests.engine.test_llm_engine import make_engine

    with pytest.raises(InvalidRequestError, match="tokenizer"):
        make_engine().add_request([1, 2], SamplingParams(guided=GuidedDecoding(regex="a")))


# ----------------------------------------------------------------------------- the backend side


def random_bitmask(rng, rows: int, vocab: int) -> np.ndarray:
    return rng.integers(-(2**31), 2**31, size=(rows, bitmask_words(vocab)), dtype=np.int64).astype(np.int32)


def test_unpack_bitmask_matches_numpy_and_masks_only_constrained_rows():
    rng = np.random.default_rng(0)
    vocab = 1000  # not a multiple of 32
    packed = random_bitmask(rng, 3, vocab)
    want = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    assert (unpack_bitmask(torch.from_numpy(packed), vocab).numpy() == want).all()
    # a mask narrower than the logits disallows the tokens past it
    wide = unpack_bitmask(torch.from_numpy(packed), vocab + 40).numpy()
    bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little").astype(bool)
    assert bits.shape[1] == 1024 and (wide[:, :1024] == bits).all() and not wide[:, 1024:].any()

    logits = torch.randn(3, vocab)
    before = logits.clone()
    rows = [SamplingRow(SamplingParams(), 0, 0, token_bitmask=packed[0]),
            SamplingRow(SamplingParams(), 0, 0),
            SamplingRow(SamplingParams(), 0, 0, token_bitmask=packed[2])]
    out = apply_token_bitmask(logits, rows)
    assert torch.equal(logits, before), "the input logits are not modified"
    assert torch.equal(out[1], logits[1])
    for r in (0, 2):
        assert torch.isneginf(out[r][~torch.from_numpy(want[r])]).all()
        assert torch.equal(out[r][torch.from_numpy(want[r])], logits[r][torch.from_numpy(want[r])])
    assert apply_token_bitmask(logits, [SamplingRow(SamplingParams(), 0, 0)] * 3) is logits


@pytest.mark.parametrize("params", [
    dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_k=5), dict(temperature=1.0, min_p=0.05), dict(temperature=0.0, logprobs=True, top_logprobs=3),
])
def test_sampler_draws_only_allowed_tokens(params):
    rng = np.random.default_rng(1)
    vocab, num = 4096, 6
    mask = np.zeros((num, vocab), dtype=bool)
    for r in range(num):
        mask[r, rng.choice(vocab, size=r * 3 + 1, replace=False)] = True
    packed = np.packbits(mask, axis=1, bitorder="little").view(np.int32)
    logits = torch.randn(num, vocab) * 5
    for step in range(5):
        rows = [SamplingRow(SamplingParams(**params), seed=r, step=step, token_bitmask=packed[r]) for r in range(num)]
        out = sample(logits, rows)
        assert all(mask[r, out.token_ids[r]] for r in range(num)), out.token_ids
        if out.logprobs is not None:
            assert np.isfinite(out.logprobs).all()


# ----------------------------------------------------------------------------- the engine side


def test_regex_and_choice_outputs_match(tok):
    eng = toy_engine(tok)
    reqs = run(eng, tok, [
        SamplingParams(max_tokens=40, temperature=1.0, seed=3, guided=GuidedDecoding(regex=r"[a-c]{2,5}-[0-9]{3}")),
        SamplingParams(max_tokens=40, temperature=0.0, guided=GuidedDecoding(choice=["yes", "no", "maybe later"])),
        SamplingParams(max_tokens=40, temperature=1.0, seed=5, guided=GuidedDecoding(ebnf='root ::= "x" [0-9] ("," [0-9])*  "."')),
    ], prompts=[prompt_of(tok)] * 3)
    assert re.fullmatch(r"[a-c]{2,5}-[0-9]{3}", text_of(tok, reqs[0])), text_of(tok, reqs[0])
    assert text_of(tok, reqs[1]) in ("yes", "no", "maybe later")
    assert re.fullmatch(r"x[0-9](,[0-9])*\.", text_of(tok, reqs[2])), text_of(tok, reqs[2])
    for r in reqs:
        # the grammar ends the sequence: complete, with no EOS sampled
        assert r.finish_reason == "stop" and not set(r.output_token_ids) & tok.eos_token_ids
    eng.check_integrity()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schemas_validate_on_a_random_model(tok, temperature):
    eng = toy_engine(tok)
    names = list(SCHEMAS)
    params = [SamplingParams(max_tokens=400, temperature=temperature, seed=i,
                             guided=GuidedDecoding(json_schema=SCHEMAS[n])) for i, n in enumerate(names)]
    reqs = run(eng, tok, params, prompts=[prompt_of(tok, n) for n in names])
    for name, r in zip(names, reqs):
        text = text_of(tok, r)
        assert r.finish_reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert eng.scheduler.num_forced_tokens > 0
    eng.check_integrity()


def test_json_object_gives_an_object(tok):
    eng = toy_engine(tok)
    guided = GuidedDecoding(json_object=True)
    # random tokens rarely close an open object: where max_tokens comes first, the grammar
    # closes it (tests/engine/test_grammar_budget.py)
    reqs = run(eng, tok, SamplingParams(max_tokens=60, temperature=1.0, seed=2, n=1, guided=guided))
    text = text_of(tok, reqs[0])
    assert text.startswith("{") and isinstance(json.loads(text), dict)


def test_constrained_rows_do_not_disturb_unconstrained_ones(tok):
    free = SamplingParams(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = run(toy_engine(tok), tok, [free, greedy], prompts=[prompt_of(tok, "a b"), prompt_of(tok, "c d")])
    eng = toy_engine(tok)
    mixed = [
        SamplingParams(max_tokens=200, temperature=1.0, seed=1, guided=GuidedDecoding(json_schema=SCHEMAS["flat_person"])),
        free,
        SamplingParams(max_tokens=30, temperature=0.0, guided=GuidedDecoding(regex="[0-9]{4}")),
        greedy,
    ]
    reqs = run(eng, tok, mixed, prompts=[prompt_of(tok, "x"), prompt_of(tok, "a b"), prompt_of(tok, "y"), prompt_of(tok, "c d")])
    assert reqs[1].output_token_ids == alone[0].output_token_ids
    assert reqs[3].output_token_ids == alone[1].output_token_ids
    jsonschema.validate(json.loads(text_of(tok, reqs[0])), SCHEMAS["flat_person"])
    assert re.fullmatch("[0-9]{4}", text_of(tok, reqs[2]))


def test_jump_forward_deltas_add_up_and_respect_max_tokens(tok):
    schema = SCHEMAS["tool_call_like"]
    eng = toy_engine(tok)
    rid = eng.add_request(prompt_of(tok), SamplingParams(max_tokens=300, temperature=0.0, guided=GuidedDecoding(json_schema=schema)))
    (req,) = eng._requests[rid]
    ids, text, steps = [], "", 0
    while eng.has_unfinished():
        for d in eng.step():
            ids += d.token_ids
            text += d.text
            assert d.num_output_tokens == len(ids)
        steps += 1
    assert ids == req.output_token_ids and text == tok.decode(ids)
    jsonschema.validate(json.loads(text), schema)
    forced = eng.scheduler.num_forced_tokens
    assert forced > 0 and steps <= len(ids) - forced + 1
    # the plan of a step after a jump feeds several new tokens for one sequence
    assert any(int(q) > 1 for p in eng.backend.plans[1:] for q in p.query_lens)

    # the same request cut by max_tokens: never more tokens than asked, even mid-jump
    for limit in range(1, 12):
        eng = toy_engine(tok)
        (r,) = run(eng, tok, SamplingParams(max_tokens=limit, temperature=0.0, guided=GuidedDecoding(json_schema=schema)))
        assert len(r.output_token_ids) == limit and r.finish_reason == "length"
        assert text.startswith(text_of(tok, r)) or limit == 1


def test_jump_forward_off_gives_the_same_kind_of_output(tok):
    schema = SCHEMAS["nested_address"]
    eng = toy_engine(tok, enable_jump_forward=False)
    (r,) = run(eng, tok, SamplingParams(max_tokens=300, temperature=0.0, guided=GuidedDecoding(json_schema=schema)))
    jsonschema.validate(json.loads(text_of(tok, r)), schema)
    assert eng.scheduler.num_forced_tokens == 0


def test_stop_string_inside_forced_text_cuts_tokens(tok):
    schema = SCHEMAS["flat_person"]  # '", "age": ' is forced after the name
    eng = toy_engine(tok)
    rid = eng.add_request(prompt_of(tok), SamplingParams(max_tokens=200, temperature=0.0, stop=['"age'],
                                                          guided=GuidedDecoding(json_schema=schema)))
    (req,) = eng._requests[rid]
    text, ids = "", []
    while eng.has_unfinished():
        for d in eng.step():
            text += d.text
            ids += d.token_ids
    assert req.finish_reason == "stop" and req.stop_reason == '"age'
    assert text.startswith('{"name": "') and text.endswith(", ") and '"age' not in text
    assert ids == req.output_token_ids
    assert tok.decode(ids).startswith(text) and '"age' in tok.decode(ids)


def test_logprobs_requests_decode_token_by_token(tok):
    eng = toy_engine(tok)
    rid = eng.add_request(prompt_of(tok), SamplingParams(max_tokens=200, temperature=0.0, logprobs=True,
                                                          guided=GuidedDecoding(json_schema=SCHEMAS["enum_color"])))
    deltas = []
    while eng.has_unfinished():
        deltas += eng.step()
    assert all(len(d.token_ids) == 1 and len(d.logprobs) == 1 for d in deltas)
    assert all(np.isfinite(d.logprobs[0].logprob) for d in deltas)
    json.loads("".join(d.text for d in deltas))
    assert eng.scheduler.num_forced_tokens == 0


def test_n_choices_each_follow_the_grammar(tok):
    eng = toy_engine(tok)
    (seqs,) = eng.generate([prompt_of(tok)], SamplingParams(
        n=3, max_tokens=40, temperature=1.0, seed=9, guided=GuidedDecoding(regex="[a-z]{3}[0-9]{2}")))
    texts = [text_of(tok, s) for s in seqs]
    assert all(re.fullmatch("[a-z]{3}[0-9]{2}", t) for t in texts), texts
    assert len({id(s.grammar) for s in seqs}) == 3


# ----------------------------------------------------------------------------- the state


def test_rollback_restores_state_and_mask(tok):
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    assert tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids)) is tg
    compiled = tg.compile(GuidedDecoding(json_schema=SCHEMAS["flat_person"]))
    state = tg.new_state(compiled)
    text = '{"name": "Al", "age": 7}'
    ids = tok.encode(text, add_special_tokens=False)
    if tg.text_in_context(ids) != text:  # a tokenizer that prefixes a space: drop it
        ids = ids[1:]
    assert tg.text_in_context(ids) == text
    masks = [state.bitmask.copy()]
    for t in ids:
        assert state.accept(t), tok.id_to_piece(t)
        state.fill_bitmask()
        masks.append(state.bitmask.copy())
    assert state.matcher.is_completed() and state.done
    for n in (1, 3, len(ids) - 2):
        state.rollback(n)
        assert (state.bitmask == masks[len(ids) - n]).all()
        assert not state.done
        for t in ids[len(ids) - n:]:
            assert state.accept(t)
        state.fill_bitmask()
        assert (state.bitmask == masks[-1]).all()
    with pytest.raises(AssertionError):
        state.rollback(len(ids) + 1)
    # a stop token terminates the grammar
    assert state.accept(min(tok.eos_token_ids)) and state.terminated


def test_special_tokens_are_never_allowed_as_text(tok):
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    state = tg.new_state(tg.compile(GuidedDecoding(regex=".*")))
    allowed = np.flatnonzero(np.unpackbits(state.bitmask.view(np.uint8), bitorder="little")[: tok.vocab_size])
    assert set(allowed.tolist()) & tok.special_token_ids == set(tok.eos_token_ids) & tok.special_token_ids
    assert isinstance(tg, TokenizerGrammar)
