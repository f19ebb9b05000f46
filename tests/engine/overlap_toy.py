"""Toy backends with `execute_async` for overlap-scheduling tests.

A submitted step runs at once, in submission order (what a device stream does). Its placeholder
rows take the ids that the previously submitted step sampled, kept here the way a GPU backend
keeps them on the device; the engine leaves 0 in input_ids there, so an engine that fed a wrong
or stale id (or a backend that ignored the placeholders) produces different tokens.
`result()` must be called once per step, in submission order.
"""

from __future__ import annotations

import numpy as np

from localserve.engine.plan import ForwardOutput, Plan
from tests.engine.grammar_toy import LogitsToyBackend
from tests.engine.toy_backend import ToyBackend


class _Handle:
    def __init__(self, owner, seq: int, out: ForwardOutput) -> None:
        self.owner, self.seq, self.out = owner, seq, out

    def result(self) -> ForwardOutput:
        assert self.owner.next_result == self.seq, "results taken out of submission order"
        self.owner.next_result += 1
        return self.out


class _AsyncMixin:
    def _init_async(self) -> None:
        self.last_ids = np.zeros(0, dtype=np.int64)
        self.submitted = 0
        self.next_result = 0
        self.placeholder_rows = 0

    def execute_async(self, plan: Plan) -> _Handle:
        if plan.has_placeholders:
            assert (plan.input_ids[plan.placeholder_rows] == 0).all()
            plan.input_ids = plan.input_ids.copy()
            plan.input_ids[plan.placeholder_rows] = self.last_ids[plan.placeholder_src]
            self.placeholder_rows += len(plan.placeholder_rows)
        out = self.execute(plan)
        self.last_ids = out.token_ids.copy()
        handle = _Handle(self, self.submitted, out)
        self.submitted += 1
        return handle


class AsyncToyBackend(_AsyncMixin, ToyBackend):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._init_async()


class AsyncLogitsToyBackend(_AsyncMixin, LogitsToyBackend):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._init_async()
