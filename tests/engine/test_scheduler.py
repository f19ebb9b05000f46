"""Scheduler + KV manager driven directly with the toy backend."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from localserve.engine.request import Request, RequestStatus
from localserve.engine.sampling_params import SamplingParams
from localserve.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.toy_backend import ToyBackend, reference_generate

VOCAB = 50
EOS = frozenset({0})


class Harness:
    def __init__(self, num_blocks=64, block_size=4, budget=32, max_seqs=8, max_context=128, cache=True):
        self.cfg = SchedulerConfig(
            max_num_seqs=max_seqs,
            max_num_batched_tokens=budget,
            max_context=max_context,
            block_size=block_size,
            num_blocks=num_blocks,
            enable_prefix_cache=cache,
        )
        self.sched = Scheduler(self.cfg, EOS)
        self.backend = ToyBackend(VOCAB)
        self.backend.init_kv(num_blocks, block_size)
        self.next_id = 0
        self.reqs: list[Request] = []

    def add(self, prompt, params, seed=0, wait_for=None):
        req = Request(str(self.next_id), self.next_id, list(prompt), params, seed, wait_for=wait_for)
        self.next_id += 1
        self.sched.add(req)
        self.reqs.append(req)
        return req

    def step(self):
        plan = self.sched.schedule()
        if plan is None:
            return None
        assert plan.num_tokens <= self.cfg.max_num_batched_tokens
        assert plan.num_seqs <= self.cfg.max_num_seqs
        out = self.backend.execute(plan)
        self.sched.update(plan, out)
        return plan

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
            self.sched.check_integrity()
        raise AssertionError("did not finish")

    def expected(self, req):
        return reference_generate(req.prompt_token_ids, req.params, req.seed, VOCAB, EOS, self.cfg.max_context)


def greedy(max_tokens=8, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def test_batched_equals_alone():
    prompts = [[5, 6, 7], list(range(1, 40)), [9] * 17, [3, 1, 4, 1, 5, 9, 2, 6]]
    h = Harness()
    reqs = [h.add(p, greedy(12, ignore_eos=True)) for p in prompts]
    h.run()
    for r in reqs:
        assert r.output_token_ids == h.expected(r)
        assert r.status is RequestStatus.FINISHED_LENGTH


def test_chunked_prefill_respects_budget_and_matches():
    h = Harness(budget=8)
    r = h.add(list(range(1, 30)), greedy(5, ignore_eos=True))
    plans = []
    while h.sched.has_unfinished():
        plans.append(h.step())
    assert [p.num_tokens for p in plans[:4]] == [8, 8, 8, 5]
    assert len(plans[0].sample_idx) == 0 and len(plans[3].sample_idx) == 1
    assert r.output_token_ids == h.expected(r)


def test_prefix_hit_equals_cold_and_counts_cached_tokens():
    h = Harness()
    system = list(range(1, 30))
    a = h.add(system + [40, 41], greedy(6, ignore_eos=True))
    h.run()
    b = h.add(system + [42, 43], greedy(6, ignore_eos=True))
    h.run()
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 28  # 7 whole pages of the shared 29-token prefix
    assert b.output_token_ids == h.expected(b)
    # the finished request's output is cached too: a follow-up turn hits prompt + answer
    c = h.add(a.all_token_ids + [44], greedy(3, ignore_eos=True))
    h.run()
    assert c.num_cached_tokens == (len(a.all_token_ids) - 1) // 4 * 4
    assert c.output_token_ids == h.expected(c)


def test_full_prompt_hit_still_computes_last_token():
    h = Harness()
    p = list(range(1, 17))  # exactly 4 pages
    a = h.add(p, greedy(3, ignore_eos=True))
    h.run()
    b = h.add(p, greedy(3, ignore_eos=True))
    h.run()
    assert b.num_cached_tokens == 12
    assert b.output_token_ids == a.output_token_ids == h.expected(a)


def test_preemption_by_recompute_when_pages_run_out():
    h = Harness(num_blocks=12, block_size=4, budget=64, cache=False)
    reqs = [h.add([i + 1] * 10, greedy(20, ignore_eos=True)) for i in range(3)]
    h.run()
    assert h.sched.num_preemptions > 0
    for r in reqs:
        assert r.output_token_ids == h.expected(r)
    assert h.sched.kv.pool.num_free == 12


def test_fork_waits_for_leader_and_shares_prompt_pages():
    h = Harness()
    prompt = list(range(1, 22))
    p = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    lead = h.add(prompt, p, seed=1)
    fork = h.add(prompt, p, seed=2, wait_for=lead)
    first = h.step()
    assert first.seq_ids == [lead.seq_id]
    h.run()
    assert fork.num_cached_tokens == 20
    assert lead.output_token_ids == h.expected(lead)
    assert fork.output_token_ids == h.expected(fork)
    assert lead.output_token_ids != fork.output_token_ids


def test_abort_releases_pages_at_once():
    h = Harness(cache=False)
    r = h.add(list(range(1, 30)), greedy(50, ignore_eos=True))
    h.step()
    assert h.sched.kv.pool.num_free < 64
    h.sched.finish(r, RequestStatus.FINISHED_ABORTED)
    assert h.sched.kv.pool.num_free == 64
    assert not h.sched.has_unfinished()
    h.sched.check_integrity()


def test_stop_token_and_context_limit():
    h = Harness(max_context=20)
    r = h.add(list(range(1, 15)), SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))
    h.run()
    assert r.num_tokens == 20 and r.status is RequestStatus.FINISHED_LENGTH
    free_run = h.add([7, 8, 9], greedy(10, ignore_eos=True))
    h.run()
    stop_tok = free_run.output_token_ids[3]
    s = h.add([7, 8, 9], greedy(10, ignore_eos=True, stop_token_ids=[stop_tok]))
    h.run()
    cut = free_run.output_token_ids.index(stop_tok) + 1
    assert s.output_token_ids == free_run.output_token_ids[:cut]
    assert s.status is RequestStatus.FINISHED_STOPPED and s.stop_reason == stop_tok


# -- randomized property test ------------------------------------------------------------

op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 40), st.integers(1, 24), st.booleans(), st.integers(1, 3)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, min_size=1, max_size=40),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(4, 48),
    cache=st.booleans(),
)
def test_random_workloads_keep_invariants_and_outputs(ops, num_blocks, block_size, budget, cache):
    max_context = 64
    h = Harness(num_blocks=num_blocks, block_size=block_size, budget=budget, max_seqs=6, max_context=max_context, cache=cache)
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(30)] for _ in range(4)]
    aborted: set[int] = set()
    for o in ops:
        if o[0] == "add":
            _, which, plen, max_tokens, sample, n = o
            plen = min(plen, max_context - 1)
            # keep every request small enough to fit in memory alone
            max_tokens = max(1, min(max_tokens, num_blocks * block_size // 2 - plen))
            if max_tokens < 1 or plen + max_tokens > num_blocks * block_size // 2:
                continue
            prompt = (prefixes[which] + [rng.randrange(1, VOCAB) for _ in range(40)])[:plen]
            params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if sample else 0.0)
            lead = h.add(prompt, params, seed=rng.randrange(1 << 30))
            for i in range(1, n):
                h.add(prompt, params, seed=rng.randrange(1 << 30), wait_for=lead)
        elif o[0] == "step":
            for _ in range(o[1]):
                h.step()
                h.sched.check_integrity()
        else:
            live = [r for r in h.reqs if not r.finished]
            if live:
                victim = live[o[1] % len(live)]
                aborted.add(victim.seq_id)
                h.sched.finish(victim, RequestStatus.FINISHED_ABORTED)
        h.sched.check_integrity()
    h.run()
    event(f"preempted: {h.sched.num_preemptions > 0}")
    event(f"prefix hits: {h.sched.kv.prefix_hit_tokens > 0}")
    for r in h.reqs:
        if r.seq_id in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
            continue
        assert r.finished and r.output_token_ids == h.expected(r)
    # nothing leaks: every page is free or held only by the prefix cache
    kv = h.sched.kv
    assert kv.pool.num_free + kv.tree.num_pages == num_blocks
    kv.tree.reset()
    assert kv.pool.num_free == num_blocks
