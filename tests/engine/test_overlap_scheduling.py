"""Overlap scheduling: the engine with execute_async gives the same tokens as without it."""

from __future__ import annotations

import pytest

from localserve.engine.guided import GuidedDecoding
from localserve.engine.llm_engine import EngineConfig, LLMEngine
from localserve.engine.sampling_params import SamplingParams
from localserve.models.config import ModelConfig
from tests.engine.grammar_schemas import SCHEMAS
from tests.engine.overlap_toy import AsyncLogitsToyBackend, AsyncToyBackend
from tests.engine.toy_backend import reference_generate

VOCAB = 50
CFG = ModelConfig(
    architecture="llama", vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_layers=1,
    num_heads=1, num_kv_heads=1, head_dim=8, max_context=96, rms_norm_eps=1e-6, rope_theta=1e4,
    eos_token_ids=(0,),
)


def toy_engine(overlap: bool, num_blocks: int = 64, **kw) -> LLMEngine:
    return LLMEngine(AsyncToyBackend(VOCAB, num_blocks), CFG, None,
                     EngineConfig(block_size=4, async_scheduling=overlap, **kw))


def drive(eng: LLMEngine, work: list[tuple[list[int], SamplingParams]], abort_after: dict[int, int],
          add_late: int = 0) -> dict:
    """Runs `work` to the end, checking integrity after every step. Request i is aborted as soon
    as it has received abort_after[i] tokens; the last `add_late` requests are added once the
    first step has produced output. Returns per request (n outputs, finish reasons)."""
    ids: dict[str, int] = {}
    got: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], str | None] = {}
    early = work[: len(work) - add_late]
    for i, (prompt, p) in enumerate(early):
        ids[eng.add_request(prompt, p, request_id=f"r{i}")] = i
    added_late = False
    while eng.has_unfinished() or not added_late:
        deltas = eng.step()
        eng.check_integrity()
        if not added_late and (deltas or not eng.has_unfinished()):
            for j, (prompt, p) in enumerate(work[len(early):], start=len(early)):
                ids[eng.add_request(prompt, p, request_id=f"r{j}")] = j
            added_late = True
        for d in deltas:
            key = (d.request_id, d.index)
            got.setdefault(key, []).extend(d.token_ids)
            if d.finished:
                reasons[key] = d.finish_reason
            i = ids[d.request_id]
            if i in abort_after and len(got[key]) >= abort_after[i] and not d.finished:
                eng.abort(d.request_id)
                reasons[key] = "abort"
    kv = eng.scheduler.kv
    assert kv.pool.num_free + kv.tree.num_pages == kv.num_blocks, "pages leaked"
    return {k: (v, reasons.get(k)) for k, v in sorted(got.items())}


def mixed_work(seed: int) -> list[tuple[list[int], SamplingParams]]:
    import random

    rng = random.Random(seed)
    shared = [rng.randrange(1, VOCAB) for _ in range(13)]
    work = []
    for i in range(14):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))]
        kind = i % 5
        if kind == 0:
            p = SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0.0, ignore_eos=True)
        elif kind == 1:
            p = SamplingParams(max_tokens=40, temperature=1.0, seed=i, stop_token_ids=[7, 11, 13])
        elif kind == 2:
            p = SamplingParams(max_tokens=25, temperature=1.0, seed=i, n=3, ignore_eos=True)
        elif kind == 3:
            p = SamplingParams(max_tokens=None, temperature=1.0, seed=i)  # eos or the context
        else:
            p = SamplingParams(max_tokens=1, temperature=0.0)
        work.append((prompt, p))
    return work


@pytest.mark.parametrize("seed,num_blocks,max_num_seqs,budget", [
    (0, 64, 8, 64), (1, 24, 6, 16), (2, 40, 16, 8), (3, 200, 64, 512),
])
def test_overlap_matches_synchronous_token_for_token(seed, num_blocks, max_num_seqs, budget):
    work = mixed_work(seed)
    aborts = {1: 3, 5: 1, 8: 6}  # n == 1 only: forks' token counts at an abort depend on timing
    kw = dict(num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    sync_eng, async_eng = toy_engine(False, **kw), toy_engine(True, **kw)
    sync = drive(sync_eng, work, aborts, add_late=4)
    over = drive(async_eng, work, aborts, add_late=4)
    assert over == sync
    assert async_eng.backend.placeholder_rows > 0, "nothing overlapped"
    assert sync_eng.backend.placeholder_rows == 0
    # and both are the model's own tokens (without pages or batching) where not aborted
    for i, (prompt, p) in enumerate(work):
        if i in aborts:
            continue
        for (rid, idx), (toks, _) in over.items():
            if rid == f"r{i}" and idx == 0 and p.n == 1:
                if p.seed is not None or p.temperature == 0.0:
                    assert toks == reference_generate(prompt, p, p.seed or 0, VOCAB, {0}, CFG.max_context)
    if num_blocks <= 24:
        assert async_eng.scheduler.num_preemptions > 0


def test_aborted_requests_stop_at_the_abort_and_free_their_pages():
    eng = toy_engine(True)
    p = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    rid = eng.add_request(list(range(1, 10)), p)
    eng.add_request(list(range(3, 9)), p)
    eng.step()
    eng.step()
    eng.abort(rid)
    eng.check_integrity()
    while eng.has_unfinished():
        eng.step()
        eng.check_integrity()
    kv = eng.scheduler.kv
    assert kv.pool.num_free + kv.tree.num_pages == kv.num_blocks
    assert not eng.scheduler._pending and eng.scheduler.num_inflight == 0


def test_env_override_and_backends_without_execute_async(monkeypatch):
    from tests.engine.toy_backend import ToyBackend

    plain = LLMEngine(ToyBackend(VOCAB, 64), CFG, None, EngineConfig(block_size=4, async_scheduling=True))
    assert not plain.async_scheduling
    assert toy_engine(None).async_scheduling
    monkeypatch.setenv("LOCALSERVE_ASYNC_SCHEDULING", "0")
    assert not toy_engine(None).async_scheduling
    monkeypatch.setenv("LOCALSERVE_ASYNC_SCHEDULING", "1")
    assert toy_engine(False).async_scheduling


# ------------------------------------------------------------------ with a tokenizer: stop strings,
# grammar rows (which force the synchronous order) and penalties mixed in

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from localserve.models.tokenizer import Tokenizer
    from tests.models.tokenizer_builders import write_byte_level_gguf

    d = tmp_path_factory.mktemp("tok_overlap")
    return Tokenizer.from_gguf(write_byte_level_gguf(d / "t.gguf"), cache_dir=d / "cache")


def text_engine(tok, overlap: bool) -> LLMEngine:
    vocab = tok.vocab_size
    cfg = ModelConfig(
        architecture="llama", vocab_size=vocab, hidden_size=8, intermediate_size=16, num_layers=1,
        num_heads=1, num_kv_heads=1, head_dim=8, max_context=1024, rms_norm_eps=1e-6,
        rope_theta=1e4, eos_token_ids=tuple(sorted(tok.eos_token_ids)),
    )
    return LLMEngine(AsyncLogitsToyBackend(vocab, 96), cfg, tok,
                     EngineConfig(block_size=8, max_num_seqs=6, async_scheduling=overlap))


def test_overlap_with_stop_strings_grammar_and_penalties(tok):
    def prompt(text):
        return tok.encode(text, add_special_tokens=False)

    work = [
        (prompt("a b c"), SamplingParams(max_tokens=60, temperature=1.0, seed=1, stop=["e", " t"])),
        (prompt("Reply in JSON:"), SamplingParams(max_tokens=200, temperature=1.0, seed=2,
                                                   guided=GuidedDecoding(json_schema=SCHEMAS["flat_person"]))),
        (prompt("x y"), SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True)),
        (prompt("q"), SamplingParams(max_tokens=30, temperature=1.0, seed=4, frequency_penalty=1.5,
                                     repetition_penalty=1.3, ignore_eos=True)),
        (prompt("a b c"), SamplingParams(max_tokens=50, temperature=0.0, stop=["a"], n=2, seed=9)),
        (prompt("zz"), SamplingParams(max_tokens=30, temperature=1.0, seed=6, logprobs=True,
                                      top_logprobs=2, ignore_eos=True)),
        (prompt("Reply in JSON:"), SamplingParams(max_tokens=30, temperature=0.0,
                                                   guided=GuidedDecoding(regex="[0-9]{4}"))),
        (prompt("more text here"), SamplingParams(max_tokens=45, temperature=1.0, seed=8,
                                                   stop=["an"], include_stop_str_in_output=True)),
    ]
    results = []
    for overlap in (False, True):
        eng = text_engine(tok, overlap)
        results.append(drive(eng, work, {2: 5}, add_late=3))
        if overlap:
            assert eng.backend.placeholder_rows > 0
    assert results[1] == results[0]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_prompt_is_a_prefix_hit_for_the_next_planned_step(overlap):
    """A and B share a 16-token prompt; the token budget fits one of them per step. B is
    admitted in the step after A's prefill, which under overlap is planned before A's step has
    run: it must still reuse A's pages (they are cached when A's step is scheduled)."""
    eng = toy_engine(overlap, max_num_batched_tokens=16)
    p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = list(range(1, 17))
    a = eng.add_request(prompt, p)
    b = eng.add_request(prompt + [20, 21], p)
    cached, got = {}, {}
    while eng.has_unfinished():
        for d in eng.step():
            cached[d.request_id] = d.num_cached_tokens
            got.setdefault(d.request_id, []).extend(d.token_ids)
        eng.check_integrity()
    assert cached[a] == 0 and cached[b] == 16
    alone = toy_engine(False)
    ref = alone.add_request(prompt + [20, 21], p)
    want = []
    while alone.has_unfinished():
        for d in alone.step():
            want += d.token_ids
    assert got[b] == want and ref  # the hit changes nothing in B's tokens


def test_next_step_is_launched_before_this_steps_tokens_are_detokenized(monkeypatch):
    """The host's critical path between two device steps is update + schedule + submit: a
    step's deltas are built after the step two ahead of it was submitted, so two steps are
    in flight whenever the engine waits for one."""
    eng = toy_engine(True)
    be = eng.backend
    for i in range(3):
        eng.add_request([5 + i, 6, 7], SamplingParams(max_tokens=12, temperature=0.0,
                                                      ignore_eos=True))
    seen = []  # (steps submitted, results taken) whenever deltas are built
    real_deltas = eng._deltas

    def deltas(events):
        seen.append((be.submitted, be.next_result))
        return real_deltas(events)

    monkeypatch.setattr(eng, "_deltas", deltas)
    at_wait = []
    while eng.has_unfinished():
        eng.step()
        at_wait.append(len(eng._inflight))
    # results 0..k taken, steps 0..k+2 submitted; only the last steps have none left to plan
    assert len(seen) == 12 and all(sub == taken + 2 for sub, taken in seen[:-2]), seen
    assert at_wait[:-2] == [2] * (len(at_wait) - 2), at_wait
