"""`localserve bench --grammar` (localserve/bench/grammar.py): a tiny run on the default model."""

from __future__ import annotations

import json
import math

import pytest

from localserve.bench import grammar as gb
from localserve.cli import build_parser


def test_cli_has_grammar_mode():
    args = build_parser().parse_args(["bench", "--grammar", "--decode-tokens", "64"])
    assert args.grammar and args.decode_tokens == 64


def test_timing_wraps_and_restores():
    class Thing:
        def work(self, x):
            return x + 1

    original = Thing.__dict__["work"]
    sink: list = []
    t = Thing()
    with gb._timing(Thing, "work", sink):
        assert t.work(1) == 2
    assert Thing.__dict__["work"] is original
    assert len(sink) == 1 and sink[0][0] >= 0 and sink[0][1] >= 0 and sink[0][2] is None
    with gb._timing(Thing, "work", sink, note=lambda self, x: x * 10):
        t.work(3)
    assert sink[1][2] == 30 and Thing.__dict__["work"] is original
    t.work(2)
    assert len(sink) == 2


@pytest.mark.slow
def test_tiny_grammar_bench(default_gguf):
    r = gb.run_grammar_bench(threads=2, concurrency=(1, 2), max_tokens=64, repeats=1, warmup=0,
                             sequential=1, log=lambda m: None)
    # mask times: one fill per accepted step, each a real measurement of a 262k-vocab mask
    fill = r.timings["fill"]
    assert len(fill.wall_ms) >= 10 and all(x > 0 for x in fill.wall_ms)
    assert r.mask_stats()["fill"]["cpu_median"] < 5.0
    # _advance_grammar calls fill_bitmask, so it takes longer, call by call
    assert len(r.timings["advance"].wall_ms) <= len(fill.wall_ms)
    assert r.mask_stats()["advance"]["wall_median"] >= r.mask_stats()["fill"]["wall_median"]
    assert set(r.timings) == {"fill", "advance", "apply_c1", "apply_c2"}
    assert all(r.timings[k].wall_ms for k in ("apply_c1", "apply_c2"))
    assert [ph.key for ph in r.phases] == [f"{c} concurrent, jump-forward {s}" for c in (1, 2) for s in ("on", "off")]
    for ph in r.phases:
        con, unc = ph.constrained, ph.unconstrained
        assert con.constrained and not unc.constrained and con.jump_forward == ph.jump_forward
        assert con.batches and unc.batches  # a pass is one batch here
        for cb, ub in zip(con.batches, unc.batches):
            # every constrained output closes its JSON within max_tokens; its unconstrained twin
            # decodes as many tokens (greedy is repeatable, so the warm-up's lengths hold)
            assert cb.valid_json == len(cb.lengths)
            assert ub.lengths == cb.lengths
            if ph.jump_forward:
                assert cb.forced > 0.2 * sum(cb.lengths)
                assert len(cb.steps) < len(ub.steps)  # forced tokens take no forward step
            else:
                assert cb.forced == 0 and len(cb.steps) == len(ub.steps)
        for side in (con, unc):
            assert side.decode_steps > 0 and side.decode_seconds > 0 and math.isfinite(side.tok_per_s)
        assert 0 < ph.rate_ratio < 100
        if not ph.jump_forward:
            assert len(ph.step_ratios()) == con.decode_steps
    assert 0.2 < r.forced_by_schema()[gb.STRICT][0] / r.forced_by_schema()[gb.STRICT][1] < 1
    d = json.loads(json.dumps(r.to_dict()))
    assert d["phases"]["2 concurrent, jump-forward off"]["step_pairs"] > 0
    assert gb.STRICT in r.table()


@pytest.mark.parametrize("vocab", [262144, 1000, 1100])
def test_host_bitmask_path_equals_the_torch_path(vocab):
    """The fp32 CPU path of apply_token_bitmask (sparse rows, dense rows, unmasked rows, masks
    narrower than the logits) gives exactly the logits the device path gives."""
    import numpy as np
    import torch

    from localserve.backends.torch_common.sampling import apply_token_bitmask, unpack_bitmask
    from localserve.engine.plan import SamplingRow
    from localserve.engine.sampling_params import SamplingParams

    rng = np.random.default_rng(vocab)
    words = (min(vocab, 1024) + 31) // 32 if vocab == 1100 else (vocab + 31) // 32
    sparse = np.zeros(words, dtype=np.int32)
    for t in rng.choice(32 * words, 3, replace=False):
        sparse[t // 32] |= np.uint32(1 << int(t % 32)).view(np.int32)
    dense = rng.integers(-(2**31), 2**31, size=words, dtype=np.int64).astype(np.int32)
    dense[0] = -1  # all of a word allowed
    dense[1] = 0  # none of it
    masks = [sparse, None, dense, np.zeros(words, dtype=np.int32)]
    logits = torch.randn(4, vocab)
    logits[2, :8] = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0, 1e30, -1e30, 3.5, -2.25])
    before = logits.clone()
    rows = [SamplingRow(SamplingParams(), 0, 0, token_bitmask=m) for m in masks]
    out = apply_token_bitmask(logits, rows)
    assert torch.equal(logits, before) and out.data_ptr() != logits.data_ptr()
    for r, m in enumerate(masks):
        if m is None:
            assert torch.equal(out[r], logits[r])
            continue
        allowed = unpack_bitmask(torch.from_numpy(m)[None], vocab)[0]
        want = logits[r].masked_fill(~allowed, float("-inf"))
        assert torch.equal(out[r], want), r
        assert int((~torch.isneginf(out[r])).sum()) == int(allowed[~torch.isneginf(logits[r])].sum())


# ----------------------------------------------------------------------------- --grammar-budget


def test_cli_has_grammar_budget_mode():
    args = build_parser().parse_args(["bench", "--grammar-budget"])
    assert args.grammar_budget == (32, 64, 128, 200) and args.url is None
    args = build_parser().parse_args(["bench", "--grammar-budget", "16,48", "--url", "http://127.0.0.1:8300"])
    assert args.grammar_budget == (16, 48) and args.url == "http://127.0.0.1:8300"


def test_budget_plan_covers_every_case_at_every_budget():
    from localserve.bench.budget_schemas import SCHEMAS, TOOL_CASES
    from localserve.bench.grammar_budget import plan_answers

    plan = plan_answers((32, 64), (1.0, 0.7), (1,))
    assert len(SCHEMAS) >= 20 and len(plan) == 2 * 2 * (len(SCHEMAS) + 1 + len(TOOL_CASES))
    for (mt, temp) in [(32, 1.0), (64, 0.7)]:
        row = [a for a in plan if a.max_tokens == mt and a.temperature == temp]
        assert {a.name for a in row} == {*SCHEMAS, "json_object", *TOOL_CASES}
        assert len({a.seed for a in row}) == len(row)


def test_budget_schemas_are_schemas_the_grammar_compiles(tmp_path):
    import jsonschema

    from localserve.bench.budget_schemas import SCHEMAS, TOOLS
    from localserve.engine.grammar import tokenizer_grammar
    from localserve.engine.guided import GuidedDecoding
    from localserve.models.tokenizer import Tokenizer
    from localserve.server.tools import GENERIC, tools_from_openai
    from localserve.server.tools.grammar import forced_calls_ebnf
    from tests.models.tokenizer_builders import write_byte_level_gguf

    tok = Tokenizer.from_gguf(write_byte_level_gguf(tmp_path / "t.gguf"), cache_dir=tmp_path / "cache")
    tg = tokenizer_grammar(tok, tok.vocab_size, sorted(tok.eos_token_ids))
    for name, (prompt, schema) in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert prompt and tg.compile(GuidedDecoding(json_schema=schema)) is not None, name
    tg.compile(GuidedDecoding(ebnf=forced_calls_ebnf(tools_from_openai(TOOLS), GENERIC, parallel=True)))


def test_budget_table_counts_what_was_checked():
    from localserve.bench.grammar_budget import Answer, BudgetBenchResult

    ok = Answer("json_schema", "person", 32, 1.0, 1, "length", 32, parsed=True, valid=True)
    cut = Answer("json_schema", "order", 32, 1.0, 2, "length", 32, error="JSONDecodeError: x", text='{"a')
    leak = Answer("tool_call", "required", 32, 0.7, 3, "length", 33, parsed=True, leaked=True)
    r = BudgetBenchResult("m", 2, [ok, cut, leak], seconds=1.0, date="today")
    lines = r.table().splitlines()
    assert "| JSON | 32 | 1 | 2 | 1 | 1 | 2 | 0 | 0 |" in lines
    assert "| tool call | 32 | 0.7 | 1 | 1 | 0 | 1 | 1 | 1 |" in lines
    assert "| **all** | | | **3** | **2** | **1** | **3** | **1** | **1** |" in lines
    assert sum(line.startswith("- failed:") for line in lines) == 2
    assert json.loads(json.dumps(r.to_dict()))["answers"][1]["error"] == "JSONDecodeError: x"
