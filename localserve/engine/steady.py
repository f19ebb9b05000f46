"""The steady decode batch: the state that lets a decode step be planned with arrays.

While the same running sequences decode one token per step, in the same order, and nothing
needs their sampled tokens on the host before the next step (no grammar, no penalties), each
step's Plan follows from the last one by arithmetic: positions and seq_lens advance by one, a
page is added only to the rows that cross a page boundary, every input id is the token the
previous step sampled in the same row (a placeholder row under overlap scheduling), and every
row is sampled again. `Scheduler.schedule` takes this path when it applies and plans row by row
otherwise; both give the same Plan (tests/engine/test_steady_decode.py).

A batch starts from a step the scheduler planned row by row in which every running sequence
was scheduled and sampled; its per-request arrays are filled the first time a step is planned
from it, so a busy scheduler whose batch changes every step pays nothing for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from localserve.engine.plan import Plan, SamplingRow
from localserve.engine.request import Request

if TYPE_CHECKING:
    from localserve.engine.scheduler import ScheduledStep

_NO_LIMIT = np.iinfo(np.int64).max


class SteadyDecode:
    """A decode batch in row order (`reqs`, the scheduler's running list when it started) and
    the step whose sampled tokens are its next input ids."""

    __slots__ = ("reqs", "step", "rows", "seq_lens", "num_pages", "generated", "limit",
                 "params", "seeds", "seq_ids", "argmax_only")

    def __init__(self, reqs: list[Request], step: ScheduledStep, rows: np.ndarray,
                 seq_lens: np.ndarray) -> None:
        self.reqs = reqs
        self.step = step
        self.rows = rows  # int64 [B]: each request's row in the scheduler's BlockTableRows
        self.seq_lens = seq_lens.astype(np.int64)  # [B] tokens in KV after `step`
        # filled by `fill` when the first step is planned from this batch
        self.num_pages: np.ndarray | None = None  # int64 [B]: len(block_table)
        self.generated: np.ndarray | None = None  # int64 [B]: output tokens sampled, pending included
        self.limit: np.ndarray | None = None  # int64 [B]: `generated` at which it ends by length
        self.params: list = []
        self.seeds: list[int] = []
        self.seq_ids: list[int] = []
        self.argmax_only = False  # Plan.argmax_only: no grammar here, so the params decide

    def fill(self, pending: dict, max_context: int) -> None:
        """The per-request arrays, from the requests' state and their tokens in flight
        (`pending`: the scheduler's request -> (count, step, row)). Block tables only grow
        in `Scheduler.schedule`, so they still have the length they had after `step`."""
        reqs = self.reqs
        n = len(reqs)
        self.num_pages = np.fromiter((len(r.block_table) for r in reqs), dtype=np.int64, count=n)
        self.generated = np.fromiter(
            (len(r.output_token_ids) + (pending[r][0] if r in pending else 0) for r in reqs),
            dtype=np.int64, count=n)
        # the row-by-row schedule skips a request once generated >= max_tokens or
        # prompt + generated >= max_context: its token in flight ends it
        self.limit = np.fromiter(
            (min(_NO_LIMIT if r.params.max_tokens is None else r.params.max_tokens,
                 max_context - len(r.prompt_token_ids)) for r in reqs),
            dtype=np.int64, count=n)
        self.params = [r.params for r in reqs]
        self.seeds = [r.seed for r in reqs]
        self.seq_ids = [r.seq_id for r in reqs]
        self.argmax_only = all(p.argmax_only for p in self.params)

    @property
    def filled(self) -> bool:
        return self.generated is not None

    def within_limits(self) -> bool:
        """Whether every row may decode another token (none has its last one in flight)."""
        return bool((self.generated < self.limit).all())

    def rows_needing_page(self, block_size: int) -> list[int]:
        """Rows whose next token (at position seq_lens) starts a page they do not have yet."""
        return np.flatnonzero(self.seq_lens >= self.num_pages * block_size).tolist()

    def plan(self, table: np.ndarray, block_size: int, input_ids: np.ndarray,
             placeholders: bool) -> Plan:
        """The next step's Plan: one token per row at position seq_lens, every row sampled;
        `table` the scheduler's BlockTableRows.table (the rows' pages, already grown);
        with `placeholders`, row b's input is the id the previous step sampled in row b."""
        n = len(self.reqs)
        positions = self.seq_lens.copy()
        block_tables = table[self.rows, : int(self.num_pages.max())]
        plan = Plan(
            seq_ids=self.seq_ids,
            input_ids=input_ids,
            positions=positions,
            slot_mapping=block_tables[np.arange(n), positions // block_size].astype(np.int64)
            * block_size + positions % block_size,
            query_start_loc=np.arange(n + 1, dtype=np.int32),
            seq_lens=(positions + 1).astype(np.int32),
            block_tables=block_tables,
            sample_idx=np.arange(n, dtype=np.int32),
            sampling=self.sampling_rows(),
            block_size=block_size,
            argmax_only=self.argmax_only,
        )
        if placeholders:
            plan.placeholder_rows = np.arange(n, dtype=np.int64)
            plan.placeholder_src = np.arange(n, dtype=np.int64)
        return plan

    def sampling_rows(self) -> list[SamplingRow]:
        """This step's sampling inputs: each row's params, seed and tokens generated so far."""
        return [SamplingRow(p, s, g)
                for p, s, g in zip(self.params, self.seeds, self.generated.tolist())]

    def advance(self, step: ScheduledStep) -> None:
        """Moves the batch past `step`, which decoded one more token of every row."""
        self.step = step
        self.seq_lens += 1
        self.generated += 1
