"""LLMEngine and AsyncEngine over the toy backend."""

from __future__ import annotations

import asyncio

import pytest

from localserve.engine.async_engine import AsyncEngine
from localserve.engine.llm_engine import EngineConfig, LLMEngine
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import ContextOverflowError, InvalidRequestError
from localserve.models.config import ModelConfig
from tests.engine.toy_backend import ToyBackend, reference_generate

VOCAB = 50
CFG = ModelConfig(
    architecture="llama", vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_layers=1,
    num_heads=1, num_kv_heads=1, head_dim=8, max_context=96, rms_norm_eps=1e-6, rope_theta=1e4,
    eos_token_ids=(0,),
)


def make_engine(num_blocks=64, **kw) -> LLMEngine:
    return LLMEngine(ToyBackend(VOCAB, num_blocks), CFG, None, EngineConfig(block_size=4, **kw))


def expected(prompt, params, seed):
    return reference_generate(prompt, params, seed, VOCAB, {0}, CFG.max_context)


def test_generate_matches_reference_and_frees_everything():
    eng = make_engine()
    p = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3], list(range(5, 30)), [7] * 9]
    results = eng.generate(prompts, p)
    for prompt, (seq,) in zip(prompts, results):
        assert seq.output_token_ids == expected(prompt, p, seq.seed)
    eng.check_integrity()
    kv = eng.scheduler.kv
    assert kv.pool.num_free + kv.tree.num_pages == kv.num_blocks


def test_n_choices_share_prompt_pages_and_same_seed_reproduces():
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=1234, n=3, ignore_eos=True)
    prompt = list(range(1, 26))
    (a,) = make_engine().generate([prompt], p)
    (b,) = make_engine().generate([prompt], p)
    assert [s.output_token_ids for s in a] == [s.output_token_ids for s in b]
    assert len({tuple(s.output_token_ids) for s in a}) == 3
    assert [s.num_cached_tokens for s in a] == [0, 24, 24]
    for s in a:
        assert s.output_token_ids == expected(prompt, p, s.seed)


def test_context_overflow_is_a_typed_error_not_truncation():
    eng = make_engine()
    with pytest.raises(ContextOverflowError) as e:
        eng.add_request(list(range(1, 40)) * 3, SamplingParams(max_tokens=1))
    assert e.value.num_tokens == 117 and e.value.max_context == 96
    with pytest.raises(ContextOverflowError):
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=94))
    with pytest.raises(InvalidRequestError):
        eng.add_request([], SamplingParams())
    with pytest.raises(InvalidRequestError):
        eng.add_request([VOCAB + 1], SamplingParams())
    assert not eng.has_unfinished()


def test_a_small_kv_pool_caps_the_context_and_a_lone_sequence_always_finishes():
    # 10 pages of 4 tokens: 40 tokens of KV, under the model's 96
    eng = make_engine(num_blocks=10)
    assert eng.max_context == 40
    with pytest.raises(ContextOverflowError) as e:
        eng.add_request(list(range(1, 45)), SamplingParams(max_tokens=1))
    assert e.value.max_context == 40
    # no max_tokens: it runs until the pool (the context) is full, then stops on length
    p = SamplingParams(temperature=0.0, ignore_eos=True)
    prompts = [list(range(1, 11)), list(range(2, 12))]
    results = eng.generate(prompts, p)
    for prompt, (seq,) in zip(prompts, results):
        # both cannot fit at once: one was preempted and recomputed, and neither lost a token
        assert seq.finish_reason == "length" and len(prompt) + len(seq.output_token_ids) == 40
        assert seq.output_token_ids == reference_generate(prompt, p, seq.seed, VOCAB, {0}, 40)
    assert eng.scheduler.num_preemptions > 0
    eng.check_integrity()


def test_abort_mid_generation_releases_pages():
    eng = make_engine(enable_prefix_cache=False)
    rid = eng.add_request(list(range(1, 20)), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.scheduler.kv.pool.num_free < 64
    eng.abort(rid)
    assert eng.scheduler.kv.pool.num_free == 64
    assert not eng.has_unfinished()
    eng.check_integrity()


def test_async_stream_and_cancel_frees_pages():
    eng = make_engine(enable_prefix_cache=False)
    aeng = AsyncEngine(eng)

    async def main():
        p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        toks = []
        async for d in aeng.generate([3, 4, 5], p):
            toks += d.token_ids
            last = d
        assert toks == expected([3, 4, 5], p, 0)
        assert last.finish_reason == "length" and last.num_output_tokens == 12

        long = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
        got = 0
        gen = aeng.generate([1, 2, 3], long)
        async for _ in gen:
            got += 1
            if got == 3:
                break
        await gen.aclose()  # what a disconnecting client's handler does
        return got

    try:
        assert asyncio.run(main()) == 3
        assert eng.scheduler.kv.pool.num_free == 64
        assert not eng.has_unfinished()
    finally:
        aeng.shutdown()


def test_a_context_the_kv_pool_cannot_hold_is_a_startup_error():
    from localserve.errors import KVCapacityError

    with pytest.raises(KVCapacityError) as e:
        make_engine(num_blocks=10, max_context=64)  # 40 tokens of pages, 64 asked for
    assert "holds 40 tokens (10 pages of 4)" in str(e.value) and "(64 tokens)" in str(e.value)
    assert make_engine(num_blocks=10, max_context=40).max_context == 40


def test_a_consumer_that_falls_behind_gets_coalesced_deltas():
    from localserve.engine.async_engine import RequestDeltas
    from localserve.engine.outputs import SeqDelta, TokenLogprob

    def delta(i, tok, finish=None, index=0):
        return SeqDelta("r", index, [tok], f"<{tok}>", [TokenLogprob(tok, -1.0)], finish_reason=finish,
                        num_prompt_tokens=5, num_cached_tokens=2, num_output_tokens=i)

    async def run():
        stream = RequestDeltas(2)
        for d in (delta(1, 7), delta(2, 8), delta(1, 3, index=1), delta(3, 9, "stop"), delta(2, 4, "length", 1)):
            stream.put(d)  # all of them before the consumer looks
        return [d async for d in stream]

    out = asyncio.run(run())
    assert [(d.index, d.token_ids, d.text, d.finish_reason) for d in out] == [
        (0, [7, 8], "<7><8>", None), (1, [3], "<3>", None), (0, [9], "<9>", "stop"), (1, [4], "<4>", "length")]
    assert [len(d.logprobs) for d in out] == [2, 1, 1, 1] and out[0].num_output_tokens == 2


def test_an_error_after_deltas_arrives_after_them():
    from localserve.engine.async_engine import RequestDeltas
    from localserve.engine.outputs import SeqDelta
    from localserve.errors import EngineDeadError

    async def run():
        stream = RequestDeltas(1)
        stream.put(SeqDelta("r", 0, [1], "a"))
        stream.put(EngineDeadError("gone"))
        got = []
        with pytest.raises(EngineDeadError):
            async for d in stream:
                got.append(d.text)
        return got, stream.unfinished

    assert asyncio.run(run()) == (["a"], 0)


def test_an_error_after_the_final_delta_leaves_the_answer_whole():
    """The engine failing just after a request finished: the request has its answer."""
    from localserve.engine.async_engine import RequestDeltas
    from localserve.engine.outputs import SeqDelta
    from localserve.errors import EngineDeadError

    async def run():
        stream = RequestDeltas(1)
        stream.put(SeqDelta("r", 0, [1], "a", finish_reason="length"))
        stream.put(EngineDeadError("gone"))
        return [d.finish_reason async for d in stream]

    assert asyncio.run(run()) == ["length"]
