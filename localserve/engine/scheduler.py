"""Scheduler: continuous batching with chunked prefill under one token budget.

Each step, running sequences go first (a decode needs one token, an unfinished prefill its
next chunk), then waiting ones are admitted while budget, sequence slots and pages last.
When pages run out for a running sequence, the newest running sequence is preempted by
recompute: its pages are released (its computed KV stays in the prefix cache while memory
allows, so the recompute is often a cache hit) and it goes back to the front of the queue.

Overlap scheduling: `schedule()` may run again while earlier steps are still in flight
(submitted, their sampled ids not yet applied by `update`). A scheduled step's tokens count as
computed at once (num_computed_tokens advances in `schedule`), and each sampled row leaves a
*pending* output token: the next step feeds it as a placeholder input row (Plan.placeholder_rows)
that the backend fills from the previous step's device ids. `update` applies steps in order;
a sequence that finished meanwhile has its extra sampled token dropped. With no step in flight
(the synchronous engine) nothing is pending at `schedule` and the result is the same as before.

Steady decode: while the same running sequences decode one token a step and none needs the
host between steps, `schedule` plans the step with arrays (steady.py) instead of row by row;
the plan and the state it leaves are the same.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from localserve.engine.block_tables import BlockTableRows
from localserve.engine.grammar_close import JumpForward
from localserve.engine.kv_cache_manager import KVCacheManager
from localserve.engine.plan import ForwardOutput, Plan, SamplingRow
from localserve.engine.request import Request, RequestStatus
from localserve.engine.steady import SteadyDecode

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_context: int = 8192
    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_cache: bool = True
    # grammar-constrained requests append the text their grammar forces without a forward
    # pass per token
    enable_jump_forward: bool = True


@dataclass(slots=True)
class TokenEvent:
    """One sampled token for one sequence, as `update` reports it."""

    request: Request
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    # jump-forward: what the output gained this step when it is more than [token_id] (the
    # sampled token, possibly re-spelled, followed by the text the grammar forced after it)
    jump_ids: list[int] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.jump_ids if self.jump_ids is not None else [self.token_id]


@dataclass(slots=True, eq=False)
class ScheduledStep:
    """A step `schedule` produced whose result `update` has not applied yet."""

    plan: Plan
    plan_reqs: list[Request]  # aligned with plan.seq_ids
    sampled: list[Request]  # aligned with plan.sample_idx
    # a sampled row needs its token on the host before the next step can be planned
    # (grammar masks, penalties over the output history)
    needs_sync: bool = False


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.cfg = cfg
        self.eos_token_ids = eos_token_ids
        self.kv = KVCacheManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_cache)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._inflight: deque[ScheduledStep] = deque()  # scheduled, not yet updated, in order
        # request -> (count, step, row): its output tokens sampled in steps still in flight;
        # the newest was sampled in row `row` of `step`'s ForwardOutput
        self._pending: dict[Request, tuple[int, ScheduledStep, int]] = {}
        self._tables = BlockTableRows()
        self._last: ScheduledStep | None = None  # the step scheduled last
        # the running batch while it decodes steadily (steady.py); None: plan row by row
        self._steady: SteadyDecode | None = None
        self.enable_steady = True  # False: every step row by row (tests compare the two)
        self.num_steady_steps = 0  # steps planned from the steady batch, lifetime
        self.num_preemptions = 0
        self.num_forced_tokens = 0  # output tokens inserted by jump-forward, lifetime
        self.num_budget_closes = 0  # constrained outputs closed by their grammar at max_tokens, lifetime

    # -- queue ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        assert req.num_prompt_tokens < self.cfg.max_context, "checked by the engine"
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Ends `req` (stop, length or abort) and releases its pages at once."""
        if req.finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self._free(req)

    def _free(self, req: Request) -> None:
        """Releases req's pages; the prefix cache keeps the computed KV of known tokens only
        (under overlap, computed positions may hold a placeholder not yet on the host)."""
        self._tables.release(req)
        if req.block_table or req.cache_node is not None:
            n = req.num_computed_tokens
            req.num_computed_tokens = min(n, req.num_tokens)
            self.kv.free(req, cache=True)
            req.num_computed_tokens = n

    # -- overlap --------------------------------------------------------------------------
    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def can_overlap(self) -> bool:
        """Whether the next step can be planned before the last one's tokens are applied."""
        return not self._inflight or not self._inflight[-1].needs_sync

    def discard_inflight(self) -> None:
        """Forgets the steps in flight after the backend failed them: their sequences go back
        to recompute (preempted) unless they finished."""
        victims = {req for step in self._inflight for req in step.plan_reqs}
        self._inflight.clear()
        self._steady = None
        self._pending.clear()
        for req in [r for r in self.running if r in victims]:
            # their last KV may never have been written: nothing of it goes to the cache
            self.running.remove(req)
            self._tables.release(req)
            self.kv.free(req, cache=False)
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
        # prompts cached when their step was scheduled (_cache_prompt) may never have been
        # written: drop every page of the prefix cache that no running sequence holds
        self.kv.tree.reset()

    # -- schedule -------------------------------------------------------------------------
    def schedule(self) -> Plan | None:
        if self._steady is not None:
            plan = self._schedule_steady()
            if plan is not None:
                return plan
            self._steady = None
        budget = self.cfg.max_num_batched_tokens
        batch: list[tuple[Request, int]] = []
        preempted = False
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted a moment ago to make room for an older sequence
            total = req.num_tokens
            pend = self._pending.get(req)
            if pend is not None:
                total += pend[0]
                p = req.params
                if (p.max_tokens is not None and len(req.output_token_ids) + pend[0] >= p.max_tokens) \
                        or total >= self.cfg.max_context:
                    continue  # its token in flight ends it: update will finish it
            num_new = min(total - req.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while not self.kv.allocate(req, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                batch.append((req, num_new))
                budget -= num_new
        if not preempted:
            budget = self._admit(batch, budget)
        if not batch:
            return None
        return self._build_plan(batch)

    def _admit(self, batch: list[tuple[Request, int]], budget: int) -> int:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting.popleft()
            if (req.wait_for is not None and not self._fork_ready(req.wait_for)) \
                    or req in self._pending:  # preempted with a token in flight: after update
                skipped.append(req)
                continue
            if req.num_computed_tokens == 0 and not req.block_table:
                cached = self.kv.match(req)
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = min(cached, req.num_prompt_tokens)
                    self.kv.record_prefix_hit(req.num_prompt_tokens, req.num_cached_tokens)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate(req, num_new):
                # not enough memory now: give the matched pages back and retry next step
                self.kv.free(req, cache=False)
                req.num_computed_tokens = 0
                self.waiting.appendleft(req)
                break
            req.status = RequestStatus.RUNNING
            req.wait_for = None
            self.running.append(req)
            batch.append((req, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _cache_prompt(self, req: Request) -> None:
        """Puts req's prompt pages into the prefix cache when the step that computes their
        last chunk is scheduled, not when it has run: the backend runs steps in order, so any
        later step that reads them runs after their KV is written. Under overlap scheduling the
        next step is planned before this one's result is applied; requests it admits then hit
        this prompt's pages (a request of a group admitted one step later would miss them)."""
        n = req.num_computed_tokens
        req.num_computed_tokens = min(n, req.num_tokens)  # tokens known on the host
        self.kv.cache(req)
        req.num_computed_tokens = n

    def _fork_ready(self, leader: Request) -> bool:
        # the prompt's pages must be in the prefix cache, not just scheduled
        return leader.finished or leader.num_computed_tokens >= leader.num_prompt_tokens

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _build_plan(self, batch: list[tuple[Request, int]]) -> Plan:
        """The step's arrays, built from per-request scalars with numpy (block tables from the
        mirrored rows); advances each request's num_computed_tokens past this step."""
        bs = self.cfg.block_size
        nseq = len(batch)
        reqs = [req for req, _ in batch]
        ns = np.fromiter((n for _, n in batch), dtype=np.int64, count=nseq)
        starts = np.fromiter((req.num_computed_tokens for req in reqs), dtype=np.int64, count=nseq)
        query_start_loc = np.zeros(nseq + 1, dtype=np.int32)
        np.cumsum(ns, out=query_start_loc[1:], dtype=np.int32)
        n_tok = int(query_start_loc[-1])
        seq_lens = (starts + ns).astype(np.int32)
        rows = self._tables.rows(reqs)
        max_blocks = max(len(req.block_table) for req in reqs)
        block_tables = self._tables.table[rows, :max_blocks]
        if n_tok == nseq:  # decode-only
            positions = starts
            tok_seq = np.arange(nseq)
        else:
            tok_seq = np.repeat(np.arange(nseq), ns)
            positions = np.arange(n_tok, dtype=np.int64) + np.repeat(starts - query_start_loc[:-1], ns)
        slot_mapping = block_tables[tok_seq, positions // bs].astype(np.int64) * bs + positions % bs

        step = ScheduledStep(plan=None, plan_reqs=reqs, sampled=[])  # type: ignore[arg-type]
        ids: list[int] = []
        ph_rows: list[int] = []
        ph_src: list[int] = []
        sample_idx: list[int] = []
        sampling: list[SamplingRow] = []
        pending = self._pending
        last = self._inflight[-1] if self._inflight else None
        t = 0
        for b, (req, n) in enumerate(batch):  # per row per step: kept lean
            start = req.num_computed_tokens
            end = start + n
            prompt, output = req.prompt_token_ids, req.output_token_ids
            p = len(prompt)
            known = p + len(output)
            pend = pending.get(req)
            npend = 0 if pend is None else pend[0]
            if end <= known:
                if n == 1:
                    ids.append(output[start - p] if start >= p else prompt[start])
                else:
                    ids.extend(req.token_ids_slice(start, end))
            else:
                # the token at position `known` was sampled by the step submitted last and is
                # not on the host yet: the backend reads it from its device copy
                assert pend is not None and end == known + 1 and pend[1] is last, \
                    "one placeholder, from the last step"
                if start < known:
                    ids.extend(req.token_ids_slice(start, known))
                ids.append(0)
                ph_rows.append(t + n - 1)
                ph_src.append(pend[2])
            t += n
            req.num_computed_tokens = end
            if start < p <= end:
                self._cache_prompt(req)
            if end == known + npend:
                row = self._sampling_row(req, npend)
                pending[req] = (npend + 1, step, len(sample_idx))
                sample_idx.append(b)
                sampling.append(row)
                step.sampled.append(req)
                if req.grammar is not None or row.prompt_token_ids is not None:  # penalties
                    step.needs_sync = True
        plan = Plan(
            seq_ids=[req.seq_id for req in reqs],
            input_ids=np.array(ids, dtype=np.int64),
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            sample_idx=np.asarray(sample_idx, dtype=np.int32),
            sampling=sampling,
            block_size=bs,
        )
        if ph_rows:
            plan.placeholder_rows = np.asarray(ph_rows, dtype=np.int64)
            plan.placeholder_src = np.asarray(ph_src, dtype=np.int64)
        step.plan = plan
        self._inflight.append(step)
        self._last = step
        if (self.enable_steady and len(sample_idx) == nseq and not step.needs_sync
                and nseq == len(self.running)):
            # every running sequence decodes next step, in this order (batch is a subsequence
            # of running): the steps after it can be planned with arrays
            self._steady = SteadyDecode(reqs, step, rows, seq_lens)
        return plan

    def _schedule_steady(self) -> Plan | None:
        """The next step of the steady decode batch, or None when it does not apply (the
        batch changed, a request may be admitted, a row is at its length limit, a page is
        short): the row-by-row path then plans it, with the same result where both apply
        (the engine schedules with at most one step in flight, as that path asserts; this one
        would also take the newest of several). A queue of waiting requests with free
        sequence slots sends every step down the row-by-row path, even when none can be
        admitted (no pages, a fork waiting for its leader)."""
        sd = self._steady
        reqs = sd.reqs
        n = len(reqs)
        inflight = self._inflight
        if (sd.step is not self._last or (inflight and inflight[-1] is not sd.step)
                or self.running != reqs or n > self.cfg.max_num_batched_tokens
                or (self.waiting and n < self.cfg.max_num_seqs)):
            return None
        pending = self._pending
        if not sd.filled:
            sd.fill(pending, self.cfg.max_context)
        if not sd.within_limits():
            return None
        bs = self.cfg.block_size
        grow = sd.rows_needing_page(bs)
        if grow:
            for b in grow:
                if not self.kv.allocate(reqs[b], 1):
                    return None  # memory is short: the row-by-row path preempts
            grown = [reqs[b] for b in grow]
            self._tables.rows(grown)
            sd.num_pages[grow] = [len(r.block_table) for r in grown]
        step = ScheduledStep(plan=None, plan_reqs=reqs, sampled=reqs)  # type: ignore[arg-type]
        if inflight:  # each row's input is the token sampled in the same row of sd.step
            for b, req in enumerate(reqs):
                pending[req] = (pending[req][0] + 1, step, b)
                req.num_computed_tokens += 1
            input_ids = np.zeros(n, dtype=np.int64)
        else:  # the synchronous engine: sd.step's tokens are on the host
            for b, req in enumerate(reqs):
                pending[req] = (1, step, b)
                req.num_computed_tokens += 1
            input_ids = np.fromiter((r.output_token_ids[-1] for r in reqs), dtype=np.int64,
                                    count=n)
        plan = sd.plan(self._tables.table, bs, input_ids, placeholders=bool(inflight))
        step.plan = plan
        inflight.append(step)
        self._last = step
        sd.advance(step)
        self.num_steady_steps += 1
        return plan

    @staticmethod
    def _sampling_row(req: Request, num_pending: int = 0) -> SamplingRow:
        p = req.params
        row = SamplingRow(params=p, seed=req.seed, step=len(req.output_token_ids) + num_pending)
        if p.needs_penalties:
            row.prompt_token_ids = req.prompt_token_ids
            row.output_token_ids = req.output_token_ids
        if req.grammar is not None and req.grammar.masked:
            # a copy: the state refills its mask in update, perhaps while a device still reads
            row.token_bitmask = req.grammar.bitmask.copy()
        return row

    # -- update ---------------------------------------------------------------------------
    def update(self, plan: Plan, out: ForwardOutput) -> list[TokenEvent]:
        """Applies the oldest step in flight (`plan`): its sampled tokens, stops, finishes."""
        step = self._inflight.popleft()
        assert step.plan is plan, "update() must follow schedule() order"
        events: list[TokenEvent] = []
        pending = self._pending
        want_lp = out.logprobs is not None
        assert len(out.token_ids) == len(step.sampled), "one sampled id per sampled row"
        eos, max_context = self.eos_token_ids, self.cfg.max_context
        # per row per step: kept lean; _check_stop only where a stop is possible
        for s, (req, tok) in enumerate(zip(step.sampled, out.token_ids.tolist())):
            count, last, row = pending[req]
            if count == 1:
                del pending[req]
            else:
                pending[req] = (count - 1, last, row)
            if req.finished:
                continue  # finished or aborted while the step ran: its token is dropped
            output = req.output_token_ids
            output.append(tok)
            ev = TokenEvent(req, tok)
            p = req.params
            if want_lp and p.logprobs:
                ev.logprob = float(out.logprobs[s])
                k = p.num_top_logprobs
                if k and out.top_ids is not None:
                    ev.top = list(zip(out.top_ids[s, :k].tolist(), out.top_logprobs[s, :k].tolist()))
            events.append(ev)
            if req.grammar is not None:
                if self._advance_grammar(req, ev):
                    self._check_stop(req, tok)
            elif (tok in eos or tok in p.stop_token_ids
                  or (p.max_tokens is not None and len(output) >= p.max_tokens)
                  or len(output) + len(req.prompt_token_ids) >= max_context):
                self._check_stop(req, tok)
        return events

    def _advance_grammar(self, req: Request, ev: TokenEvent) -> bool:
        """Moves req's grammar past the sampled token, closes the output where the token
        would leave it unable to close within the token budget, else appends what the grammar
        forces next (jump-forward); fills the mask for the next sample. False if it finished req."""
        g = req.grammar
        if not g.accept(ev.token_id):
            # the backend sampled outside the mask: end the sequence rather than emit text
            # that breaks the grammar
            log.error("request %s: token %d violates its grammar", req.request_id, ev.token_id)
            self.finish(req, RequestStatus.FINISHED_STOPPED)
            return False
        room = self.cfg.max_context - req.num_tokens  # the tokens the output may still gain
        if req.params.max_tokens is not None:
            room = min(room, req.params.max_tokens - len(req.output_token_ids))
        close = g.close_within(ev.token_id, room)
        if close is not None:
            # the sampled token would leave the output unable to close in its budget: the
            # grammar's completion takes its place (it is not in the KV cache yet), and the
            # sequence ends there, parsed
            self._put_jump(req, ev, close)
            ev.logprob = ev.top = None
            self.num_budget_closes += 1
            self.finish(req, RequestStatus.FINISHED_STOPPED if g.terminated else RequestStatus.FINISHED_LENGTH)
            return False
        # jump-forward tokens have no logprobs, so requests that want them decode every token
        if self.cfg.enable_jump_forward and not g.terminated and not req.params.logprobs:
            jump = g.jump_forward(ev.token_id, room)
            if jump is not None:
                self._put_jump(req, ev, jump)
        g.fill_bitmask()
        return True

    def _put_jump(self, req: Request, ev: TokenEvent, jump: JumpForward) -> None:
        """Puts a grammar's JumpForward into req's output and the step's event; the sampled
        token is not in the KV cache yet, so it can still be re-spelled or replaced."""
        if jump.num_replaced:
            req.output_token_ids[-1:] = jump.token_ids
            ev.jump_ids = list(jump.token_ids)
        else:
            req.output_token_ids.extend(jump.token_ids)
            ev.jump_ids = [ev.token_id, *jump.token_ids]
        self.num_forced_tokens += len(ev.jump_ids) - 1

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids:
            req.stop_reason = tok if tok in p.stop_token_ids else None
            self.finish(req, RequestStatus.FINISHED_STOPPED)
        elif req.grammar is not None and req.grammar.done:
            # the grammar is complete and allows only a stop token next: stop without it
            self.finish(req, RequestStatus.FINISHED_STOPPED)
        elif p.max_tokens is not None and len(req.output_token_ids) >= p.max_tokens:
            self.finish(req, RequestStatus.FINISHED_LENGTH)
        elif req.num_tokens >= self.cfg.max_context:
            self.finish(req, RequestStatus.FINISHED_LENGTH)

    # -- invariants -----------------------------------------------------------------------
    def check_integrity(self) -> None:
        live = list(self.running) + [r for r in self.waiting if r.block_table]
        self.kv.check_integrity(live)
        for req in self.running:
            assert req.status is RequestStatus.RUNNING
            assert len(req.block_table) * self.cfg.block_size >= req.num_computed_tokens
        for req in self.waiting:
            assert req.status is RequestStatus.WAITING and not req.block_table
        for req, (count, _, _) in self._pending.items():
            assert 0 < count <= len(self._inflight)
