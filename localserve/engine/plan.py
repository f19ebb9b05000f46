"""The data that crosses the backend seam each step: plain host data, no device arrays.

`Plan` is what `Scheduler.schedule()` produces and `Backend.execute()` consumes;
`ForwardOutput` is what comes back. Token rows are flattened over the scheduled
sequences in order: sequence b owns rows query_start_loc[b]:query_start_loc[b+1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from localserve.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """Sampling inputs for one sequence that needs a next token this step."""

    params: SamplingParams
    # randomness is a pure function of (seed, step): the same seed gives the same text
    # whatever else is in the batch
    seed: int
    step: int  # tokens this sequence has generated so far
    # only filled when the params need them (penalties); else None
    prompt_token_ids: Sequence[int] | None = None
    output_token_ids: Sequence[int] | None = None
    # grammar-constrained rows: xgrammar's packed mask for this sample, int32 [ceil(V / 32)],
    # bit t % 32 of word t // 32 set iff token t is allowed; None = every token allowed
    token_bitmask: np.ndarray | None = None


@dataclass(slots=True)
class Plan:
    seq_ids: list[int]  # one per scheduled sequence, in row order
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]: block_id * block_size + offset, where each new K/V goes
    query_start_loc: np.ndarray  # int32 [B+1]
    seq_lens: np.ndarray  # int32 [B]: tokens in KV after this step (cached + new)
    block_tables: np.ndarray  # int32 [B, max_blocks]; padded with 0 past each sequence's pages
    # indices (into the B sequences) that need a sampled token this step: decodes, and
    # prefills whose last prompt chunk is in this step
    sample_idx: np.ndarray  # int32 [S]
    sampling: list[SamplingRow]  # [S], aligned with sample_idx
    block_size: int
    # overlap scheduling: token rows whose input id is not known on the host when the plan is
    # built (input_ids holds 0 there). Row placeholder_rows[i] takes the id sampled in row
    # placeholder_src[i] of the ForwardOutput of the plan submitted just before this one to
    # the same backend (execute_async); the backend reads it from its device copy. Empty or
    # None: every input id is in input_ids. Only plans given to execute_async carry them.
    placeholder_rows: np.ndarray | None = None  # int64 [P]
    placeholder_src: np.ndarray | None = None  # int64 [P]
    # a hint: every sampled row's params are SamplingParams.argmax_only and no row has a
    # token_bitmask, so the ids are the argmax of the logits. False: not known (read the rows)
    argmax_only: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start_loc)

    @property
    def has_placeholders(self) -> bool:
        return self.placeholder_rows is not None and len(self.placeholder_rows) > 0

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs


@dataclass(slots=True)
class ForwardOutput:
    token_ids: np.ndarray  # int64 [S], aligned with Plan.sample_idx
    # log-probability of each sampled token under the model's raw distribution
    # (log_softmax of the logits before temperature/penalties); None if no row asked
    logprobs: np.ndarray | None = None  # float32 [S]
    # K = max top_logprobs asked in the batch; rows that asked fewer use a prefix
    top_ids: np.ndarray | None = None  # int64 [S, K]
    top_logprobs: np.ndarray | None = None  # float32 [S, K]
