"""Overlap scheduling on the device: sampling that leaves the ids on the device, and the
handle of a submitted step.

`sample_on_device` is torch_common.sampling.sample up to its last line: the same masks,
penalties and draws (the same helpers), but the sampled ids stay a device tensor, so the next
step's placeholder rows can read them with no host round trip. The one device-to-host copy goes
into pinned memory behind an event; `SubmittedStep.result()` waits for that event only. Rows that
ask for logprobs take the synchronous sampler (its logprob gathers copy to the host).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from localserve.backends.torch_common import sampling as S
from localserve.backends.torch_common import sampling_kernels as K
from localserve.engine.plan import ForwardOutput, SamplingRow


def sample_on_device(logits: torch.Tensor, rows: Sequence[SamplingRow], argmax_only: bool = False
                     ) -> tuple[torch.Tensor, ForwardOutput | None]:
    """(token ids long [S] on logits' device, the host ForwardOutput when it is already
    known: rows with logprobs go through the synchronous sampler). `argmax_only`: the
    plan's hint (Plan.argmax_only), rows unread."""
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device), None
    if argmax_only or all(map(_plain_greedy, rows)):  # the common case, without BatchParams
        return K.argmax(logits), None
    batch = S.BatchParams.from_rows(rows, vocab_size)
    if (batch.num_logprobs >= 0).any():
        out = S.sample(logits, rows)
        return torch.from_numpy(out.token_ids).to(logits.device, non_blocking=True), out
    exact_sort = logits.device.type != "cpu"
    logits = S.apply_token_bitmask(logits, rows)
    modified = bool(batch.penalised.any() or batch.biased.any())
    if batch.greedy.all() and not modified:
        return K.argmax(logits), None
    x = logits
    if modified:
        x = logits.float()
        x = x.clone() if x is logits else x
        S._apply_logit_bias(x, rows, np.flatnonzero(batch.biased))
        S._apply_penalties(x, rows, np.flatnonzero(batch.penalised))
    token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
    greedy_idx = np.flatnonzero(batch.greedy)
    random_idx = np.flatnonzero(~batch.greedy)
    if len(greedy_idx):
        sel = S._index(greedy_idx, x)
        token_ids[sel] = K.argmax(x, None if len(greedy_idx) == num_rows else sel)
    if len(random_idx):
        probs = S._probabilities(x, random_idx, batch.temperature[random_idx])
        token_ids[S._index(random_idx, x)] = S._sample_random(probs, batch, random_idx, exact_sort)
    return token_ids, None


def _plain_greedy(row: SamplingRow) -> bool:
    """Greedy with nothing that changes the logits or asks for more than the id."""
    return row.token_bitmask is None and row.params.argmax_only


class PinnedIds:
    """Pinned host buffers the steps in flight copy their sampled ids into, taken in turn: a
    pinned allocation per step costs the host more than the copy itself. A buffer comes round
    again `depth` steps later; the engine reads a step's ids before it submits the step two
    after it, so any depth past 2 is safe (8 leaves room)."""

    def __init__(self, depth: int = 8, pin: bool = True) -> None:
        self.depth = depth
        self.pin = pin  # False: plain host memory (tests without a CUDA runtime)
        self._bufs: list[torch.Tensor | None] = [None] * depth
        self._next = 0

    def take(self, n: int) -> torch.Tensor:
        i = self._next
        self._next = (i + 1) % self.depth
        buf = self._bufs[i]
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 64), dtype=torch.long, pin_memory=self.pin)
            self._bufs[i] = buf
        return buf[:n]


class SubmittedStep:
    """What execute_async returns: the step's ids on their way to the host."""

    __slots__ = ("_host", "_event", "_out", "_events", "_start")

    def __init__(self, ids: torch.Tensor, out: ForwardOutput | None, step_events, start,
                 pinned: PinnedIds | None = None, stream: torch.cuda.Stream | None = None) -> None:
        self._out = out
        self._events = step_events  # the backend's step_events list (benchmarks), or None
        self._start = start
        self._event = None
        if out is not None:
            self._host = None
        elif ids.device.type == "cuda":
            if pinned is not None and ids.dtype == torch.long and ids.dim() == 1:
                self._host = pinned.take(ids.shape[0])
            else:
                self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._event = torch.cuda.Event(enable_timing=step_events is not None)
            self._event.record(stream)  # the step's stream: no lookup of the current one
        else:
            self._host = ids
        if step_events is not None and start is not None:
            end = self._event
            if end is None:
                end = torch.cuda.Event(enable_timing=True)
                end.record(stream)
            step_events.append((start, end))

    def result(self) -> ForwardOutput:
        if self._out is None:
            if self._event is not None:
                self._event.synchronize()
            self._out = ForwardOutput(token_ids=self._host.numpy().astype(np.int64, copy=True))
            self._host = None
        return self._out
