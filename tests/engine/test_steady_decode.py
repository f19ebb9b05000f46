"""The steady decode batch (engine/steady.py): the plans it builds with arrays equal the
row-by-row scheduler's, field by field, through admissions, finishes, aborts, forks, page
boundaries, preemption, the context limit and rows that need the host (penalties); with
overlap scheduling (placeholder rows) and without."""

from __future__ import annotations

import numpy as np
import pytest

from localserve.engine.sampling_params import SamplingParams
from tests.engine.test_overlap_scheduling import drive, mixed_work, toy_engine


def _record(eng) -> list[tuple]:
    """Wraps the engine's backend so every plan is recorded as submitted (before the toy
    backend fills its placeholder rows)."""
    plans: list[tuple] = []
    be = eng.backend

    def snapshot(plan) -> tuple:
        if plan.argmax_only:  # the hint holds: backends skip reading the rows
            assert all(r.params.argmax_only and r.token_bitmask is None for r in plan.sampling)
        # a request without a seed draws one at random (only greedy ones here)
        rows = tuple((r.params, r.seed if r.params.seed is not None else None, r.step, None if r.prompt_token_ids is None
                      else tuple(r.prompt_token_ids), None if r.output_token_ids is None
                      else tuple(r.output_token_ids)) for r in plan.sampling)
        arrays = (plan.input_ids, plan.positions, plan.slot_mapping, plan.query_start_loc,
                  plan.seq_lens, plan.block_tables, plan.sample_idx)
        ph = (None, None) if not plan.has_placeholders else (
            plan.placeholder_rows.tolist(), plan.placeholder_src.tolist())
        return (tuple(plan.seq_ids), tuple((a.dtype.str, a.shape, a.tobytes()) for a in arrays),
                rows, ph, plan.block_size)

    inside_async = []  # the toy's execute_async calls execute: record the plan once

    def execute(plan, fn=be.execute):
        if not inside_async:
            plans.append(snapshot(plan))
        return fn(plan)

    def execute_async(plan, fn=be.execute_async):
        plans.append(snapshot(plan))
        inside_async.append(True)
        try:
            return fn(plan)
        finally:
            inside_async.pop()
    be.execute, be.execute_async = execute, execute_async
    return plans


def long_work(seed: int) -> list[tuple[list[int], SamplingParams]]:
    """Long greedy and seeded decodes (steady batches), some ending by EOS or the context,
    one with penalties (its steps need the host), one fork group."""
    rng = np.random.default_rng(seed)
    work = []
    for i in range(10):
        prompt = rng.integers(1, 50, int(rng.integers(1, 30))).tolist()
        if i == 3:
            p = SamplingParams(max_tokens=30, temperature=0.0, presence_penalty=0.5, ignore_eos=True)
        elif i == 5:
            p = SamplingParams(max_tokens=35, temperature=1.0, seed=i, n=2, ignore_eos=True)
        elif i % 4 == 1:
            p = SamplingParams(max_tokens=None, temperature=1.0, seed=i)
        else:
            p = SamplingParams(max_tokens=int(rng.integers(20, 70)), temperature=0.0, ignore_eos=True)
        work.append((prompt, p))
    return work


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("work_fn,seed,num_blocks,max_num_seqs,budget", [
    (mixed_work, 0, 64, 8, 64), (mixed_work, 1, 24, 6, 16), (mixed_work, 3, 200, 64, 512),
    (long_work, 0, 200, 16, 256), (long_work, 1, 30, 8, 64), (long_work, 2, 64, 4, 8),
])
def test_steady_plans_equal_row_by_row_plans(overlap, work_fn, seed, num_blocks, max_num_seqs,
                                             budget):
    work = work_fn(seed)
    aborts = {2: 9, 6: 4}
    kw = dict(num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    fast, slow = toy_engine(overlap, **kw), toy_engine(overlap, **kw)
    slow.scheduler.enable_steady = False
    fast_plans, slow_plans = _record(fast), _record(slow)
    got_fast = drive(fast, work, aborts, add_late=3)
    got_slow = drive(slow, work, aborts, add_late=3)
    assert got_fast == got_slow
    assert len(fast_plans) == len(slow_plans)
    for i, (a, b) in enumerate(zip(fast_plans, slow_plans)):
        assert a == b, f"plan {i} differs"
    assert slow.scheduler.num_steady_steps == 0
    assert fast.scheduler.num_steady_steps > 0, "the steady path never ran"
    if num_blocks <= 30:
        assert fast.scheduler.num_preemptions > 0


def test_a_new_request_leaves_the_steady_batch_and_joins_the_next():
    eng = toy_engine(True, num_blocks=64, max_num_seqs=8)
    p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    eng.add_request([1, 2, 3], p, request_id="a")
    for _ in range(6):
        eng.step()
    before = eng.scheduler.num_steady_steps
    assert before > 0
    eng.add_request([4, 5], p, request_id="b")
    eng.step()
    eng.step()
    assert {r.request_id for r in eng.scheduler.running} == {"a", "b"}
    while eng.has_unfinished():
        eng.step()
        eng.check_integrity()
    assert eng.scheduler.num_steady_steps > before + 20
