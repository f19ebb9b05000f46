"""Scheduler: continuous batching with chunked prefill under one token budget.

Each step, running sequences go first (a decode needs one token, an unfinished prefill its
next chunk), then waiting ones are admitted while budget, sequence slots and pages last.
When pages run out for a running sequence, the newest running sequence is preempted by
recompute: its pages are released (its computed KV stays in the prefix cache while memory
allows, so the recompute is often a cache hit) and it goes back to the front of the queue.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from localserve.engine.kv_cache_manager import KVCacheManager
from localserve.engine.plan import ForwardOutput, Plan, SamplingRow
from localserve.engine.request import Request, RequestStatus

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


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.cfg = cfg
        self.eos_token_ids = eos_token_ids
        self.kv = KVCacheManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_cache)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._scheduled: list[Request] = []
        self.num_preemptions = 0
        self.num_forced_tokens = 0  # output tokens inserted by jump-forward, lifetime

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
        if req.block_table or req.cache_node is not None:
            self.kv.free(req, cache=True)

    # -- schedule -------------------------------------------------------------------------
    def schedule(self) -> Plan | None:
        budget = self.cfg.max_num_batched_tokens
        batch: list[tuple[Request, int]] = []
        preempted = False
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted a moment ago to make room for an older sequence
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
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
            if req.wait_for is not None and not self._fork_ready(req.wait_for):
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

    @staticmethod
    def _fork_ready(leader: Request) -> bool:
        return leader.finished or leader.num_computed_tokens >= leader.num_prompt_tokens

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req, cache=True)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _build_plan(self, batch: list[tuple[Request, int]]) -> Plan:
        bs = self.cfg.block_size
        n_tok = sum(n for _, n in batch)
        input_ids = np.empty(n_tok, dtype=np.int64)
        positions = np.empty(n_tok, dtype=np.int64)
        slot_mapping = np.empty(n_tok, dtype=np.int64)
        query_start_loc = np.zeros(len(batch) + 1, dtype=np.int32)
        seq_lens = np.empty(len(batch), dtype=np.int32)
        max_blocks = max(len(req.block_table) for req, _ in batch)
        block_tables = np.zeros((len(batch), max_blocks), dtype=np.int32)
        sample_idx: list[int] = []
        sampling: list[SamplingRow] = []
        t = 0
        for b, (req, n) in enumerate(batch):
            start = req.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(req.block_table, dtype=np.int64)
            input_ids[t : t + n] = req.token_ids_slice(start, start + n)
            positions[t : t + n] = pos
            slot_mapping[t : t + n] = table[pos // bs] * bs + pos % bs
            block_tables[b, : len(table)] = table
            seq_lens[b] = start + n
            t += n
            query_start_loc[b + 1] = t
            if start + n == req.num_tokens:
                sample_idx.append(b)
                sampling.append(self._sampling_row(req))
        self._scheduled = [req for req, _ in batch]
        return Plan(
            seq_ids=[req.seq_id for req in self._scheduled],
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            sample_idx=np.asarray(sample_idx, dtype=np.int32),
            sampling=sampling,
            block_size=bs,
        )

    @staticmethod
    def _sampling_row(req: Request) -> SamplingRow:
        p = req.params
        row = SamplingRow(params=p, seed=req.seed, step=len(req.output_token_ids))
        if p.needs_penalties:
            row.prompt_token_ids = req.prompt_token_ids
            row.output_token_ids = req.output_token_ids
        if req.grammar is not None and req.grammar.masked:
            # a copy: the state refills its mask in update, perhaps while a device still reads
            row.token_bitmask = req.grammar.bitmask.copy()
        return row

    # -- update ---------------------------------------------------------------------------
    def update(self, plan: Plan, out: ForwardOutput) -> list[TokenEvent]:
        scheduled = self._scheduled
        self._scheduled = []
        qlens = plan.query_lens
        for b, req in enumerate(scheduled):
            if req.status is not RequestStatus.RUNNING:
                continue  # finished or aborted while the step ran
            was_prefill = req.num_computed_tokens < req.num_prompt_tokens
            req.num_computed_tokens += int(qlens[b])
            if was_prefill and req.num_computed_tokens >= req.num_prompt_tokens:
                # share the prompt's pages with forks and concurrent requests at once
                self.kv.cache(req)
        events: list[TokenEvent] = []
        for s, b in enumerate(plan.sample_idx.tolist()):
            req = scheduled[b]
            if req.status is not RequestStatus.RUNNING:
                continue
            tok = int(out.token_ids[s])
            req.output_token_ids.append(tok)
            ev = TokenEvent(req, tok)
            if out.logprobs is not None and req.params.logprobs:
                ev.logprob = float(out.logprobs[s])
                k = req.params.num_top_logprobs
                if k and out.top_ids is not None:
                    ev.top = list(zip(out.top_ids[s, :k].tolist(), out.top_logprobs[s, :k].tolist()))
            events.append(ev)
            if req.grammar is not None and not self._advance_grammar(req, ev):
                continue
            self._check_stop(req, tok)
        return events

    def _advance_grammar(self, req: Request, ev: TokenEvent) -> bool:
        """Moves req's grammar past the sampled token, then appends what the grammar forces
        next (jump-forward) and fills the mask for the next sample. False if it finished req."""
        g = req.grammar
        if not g.accept(ev.token_id):
            # the backend sampled outside the mask: end the sequence rather than emit text
            # that breaks the grammar
            log.error("request %s: token %d violates its grammar", req.request_id, ev.token_id)
            self.finish(req, RequestStatus.FINISHED_STOPPED)
            return False
        # jump-forward tokens have no logprobs, so requests that want them decode every token
        if self.cfg.enable_jump_forward and not g.terminated and not req.params.logprobs:
            room = self.cfg.max_context - req.num_tokens
            if req.params.max_tokens is not None:
                room = min(room, req.params.max_tokens - len(req.output_token_ids))
            jump = g.jump_forward(ev.token_id, room)
            if jump is not None:
                # the sampled token is not in the KV cache yet, so it can still be re-spelled
                if jump.num_replaced:
                    req.output_token_ids[-1:] = jump.token_ids
                    ev.jump_ids = list(jump.token_ids)
                else:
                    req.output_token_ids.extend(jump.token_ids)
                    ev.jump_ids = [ev.token_id, *jump.token_ids]
                self.num_forced_tokens += len(ev.jump_ids) - 1
        g.fill_bitmask()
        return True

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
