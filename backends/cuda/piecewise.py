"""Piecewise CUDA graphs: the steps the decode graphs do not take (prefill, chunked prefill,
prefill mixed with decode, decode past the largest decode graph), as vLLM's piecewise graphs.

A step of T tokens pads to the smallest token bucket >= T. Per bucket, the work between two
attentions is one graph: the embedding and layer 0 up to its attention; layer i-1's o_proj,
norms and MLP with layer i up to its attention; the last layer's rest with the final norm. Each
layer's attention runs eagerly between them, over the step's real rows only, with the plan
the attention made for the step (FlashInfer's prefill wrappers for mixed steps). So an eager
layer's dozen launches and their Python (norms, quantizers, GEMMs, rope) become one replay and
one attention call; the output layer runs eagerly on the sampled rows.

What crosses a boundary lives in static buffers shared by every bucket: the inputs (token ids,
positions, slots: one flat block, each bucket's three rows contiguous so one copy fills them),
q [top, H, D] (rope writes it, the attention reads it), o [top, H * D] (the attention writes
it, o_proj reads it), the residual stream [top, hidden] (updated in place) and the final norm's
output [top, hidden]. Rows past the step's tokens are pads: token 0 at position 0 writing its
K/V to the scratch page. The attention never reads them and their o rows keep stale finite
values; outside the attention no row reads another, so pads change nothing real.

All graphs share one memory pool (the decode graphs' when given): they replay one at a time on
one stream and nothing they allocate outlives a replay.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from localserve import envs

from .inputs import sampled_rows

log = logging.getLogger("localserve.backends.cuda")

# the largest step (tokens) that replays piecewise graphs: past it the GPU, not the host, is
# the limit (llama-3.1-8b: ~30 ms of GEMMs at 2,048 tokens in FP8 against ~12 ms of eager launches)
DEFAULT_MAX_TOKENS = envs.PIECEWISE_MAX_TOKENS.default_value  # 2,048


def piecewise_buckets(max_tokens: int) -> tuple[int, ...]:
    """Every 16 tokens to 256, every 32 to 1,024, every 128 past it, up to max_tokens (the
    padding a step pays is under ~6% from 256 tokens on)."""
    sizes = (list(range(16, 257, 16)) + list(range(288, 1025, 32))
             + list(range(1152, 1 << 16, 128)))
    out = [s for s in sizes if s < max_tokens] + [max_tokens]
    return tuple(sorted(set(out)))


def max_tokens_default(max_num_batched_tokens: int) -> int:
    """LOCALSERVE_PIECEWISE_MAX_TOKENS, else DEFAULT_MAX_TOKENS; never past the step budget."""
    try:
        want = envs.PIECEWISE_MAX_TOKENS.get()
    except envs.EnvError as exc:
        log.warning("%s; %d instead", exc, DEFAULT_MAX_TOKENS)
        want = DEFAULT_MAX_TOKENS
    return max(16, min(want, int(max_num_batched_tokens)))


def memory_bytes(cfg, max_tokens: int, element_size: int) -> int:
    """What piecewise graphs hold beyond the decode graphs, for the KV pool's sizing: the
    static buffers and the pool's temporaries of the widest piece of the largest bucket (the
    qkv, gate|up, act and norm outputs; FP8 codes are smaller)."""
    static = max_tokens * (3 * 8 + (2 * cfg.q_size + 2 * cfg.hidden_size) * element_size)
    widest = max_tokens * (cfg.q_size + 2 * cfg.kv_size + 3 * cfg.intermediate_size
                           + 2 * cfg.hidden_size) * element_size
    return static + widest


class PiecewiseGraphs:
    def __init__(self, model, kv: list[tuple[torch.Tensor, torch.Tensor]],
                 buckets: tuple[int, ...], scratch_slot: int, device: torch.device,
                 staging=None, pool=None, capture: bool = True) -> None:
        """`capture` False runs the pieces eagerly (the CPU tests: same buffers, same order)."""
        cfg = model.cfg
        self.model = model
        self.attention = model.attention
        self.kv = kv
        self.buckets = tuple(sorted(buckets))
        self.scratch_slot = int(scratch_slot)
        self.device = device
        self.staging = staging
        self.sliding = list(cfg.layer_is_sliding)
        top = self.buckets[-1]
        dtype = model.dtype
        self.flat_inputs = torch.zeros(3 * top, dtype=torch.long, device=device)
        self.q = torch.zeros((top, cfg.num_heads, cfg.head_dim), dtype=dtype, device=device)
        self.o = torch.zeros((top, cfg.num_heads * cfg.head_dim), dtype=dtype, device=device)
        self.residual = torch.zeros((top, cfg.hidden_size), dtype=dtype, device=device)
        self.hidden = torch.zeros((top, cfg.hidden_size), dtype=dtype, device=device)
        self.pool = pool
        self.pieces: dict[int, list] = {}  # bucket → its graphs' replays (uncaptured: the fns)
        self._current = None  # (bucket, tokens, attention metadata, sampled rows) of prepare
        self.steps = 0  # steps replayed (bench reports)
        for t in reversed(self.buckets):  # the largest first: the pool's blocks fit the rest
            self.pieces[t] = self._capture(t) if capture else self._callables(t)

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def fits(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.buckets[-1]

    def bucket_for(self, num_tokens: int) -> int:
        for t in self.buckets:
            if t >= num_tokens:
                return t
        raise ValueError(f"{num_tokens} tokens: past the largest bucket {self.buckets[-1]}")

    def input_views(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bucket t's (token ids, positions, slots), each [t]: flat_inputs[:3t] as three rows."""
        return self.flat_inputs[:3 * t].view(3, t).unbind(0)

    # -- capture ------------------------------------------------------------------------
    def _callables(self, t: int) -> list:
        m = self.model
        layers = m.w.layers
        ids, pos, slots = self.input_views(t)
        q, o, res, hidden = self.q[:t], self.o[:t], self.residual[:t], self.hidden[:t]
        kv = self.kv

        def first():
            res.copy_(m.w.embed(ids))
            m.pre_attention(0, layers[0], None, res, pos, slots, kv[0], q_out=q)

        def between(i: int):
            def piece():  # layer i-1 after its attention, layer i up to its attention
                d = m.post_attention(layers[i - 1], o, res)
                m.pre_attention(i, layers[i], d, res, pos, slots, kv[i], q_out=q)
            return piece

        def last():
            m.final_norm(m.post_attention(layers[-1], o, res), res, out=hidden)

        return [first] + [between(i) for i in range(1, len(layers))] + [last]

    def _capture(self, t: int) -> list:
        fns = self._callables(t)
        ids, pos, slots = self.input_views(t)
        slots.fill_(self.scratch_slot)  # the captures write K/V to the scratch page only
        ids.zero_()
        pos.zero_()
        stream = torch.cuda.Stream(self.device)  # warm up (lazy inits, autotuning) aside
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for fn in fns:
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graphs = []
        for fn in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                fn()
            if self.pool is None:
                self.pool = g.pool()
            graphs.append(g.replay)  # the bound method keeps the graph alive
        return graphs

    # -- a step -------------------------------------------------------------------------
    def prepare(self, plan) -> None:
        """Host half: the padded inputs into bucket's static rows (one copy), the attention
        planned for the step's real rows, the sampled rows on the device."""
        n = plan.num_tokens
        t = self.bucket_for(n)
        st = self.staging
        host = np.zeros((3, t), dtype=np.int64)  # pads: token 0, position 0 ...
        host[0, :n] = plan.input_ids
        host[1, :n] = plan.positions
        host[2, :n] = plan.slot_mapping
        host[2, n:] = self.scratch_slot  # ... on the scratch page
        dst = self.flat_inputs[:3 * t]
        if st is not None:
            st.copy_to(dst, host.reshape(-1))
        else:
            dst.copy_(torch.from_numpy(host.reshape(-1)), non_blocking=True)
        meta = self.attention.prepare(plan)
        rows = sampled_rows(plan)
        rows = (st.to_device(rows, torch.long) if st is not None
                else torch.from_numpy(rows).to(self.device, non_blocking=True))
        self._current = (t, n, meta, rows)

    def input_ids(self) -> torch.Tensor:
        """The prepared step's token-id rows (overlap scheduling fills placeholders here)."""
        t, n = self._current[0], self._current[1]
        return self.input_views(t)[0][:n]

    def replay(self) -> torch.Tensor:
        """Float32 logits [S, vocab] of the prepared step's sampled rows."""
        t, n, meta, rows = self._current
        pieces = self.pieces[t]
        q, o = self.q[:n], self.o[:n]
        attend = self.attention.attend
        for i, piece in enumerate(pieces[:-1]):
            piece()
            k_cache, v_cache = self.kv[i]
            attend(q, k_cache, v_cache, meta, self.sliding[i], out=o)
        pieces[-1]()
        self.steps += 1
        m = self.model
        if rows.numel() == 0:
            return torch.empty(0, m.cfg.vocab_size, dtype=torch.float32, device=self.device)
        return m.head(self.hidden[rows])


def capture_or_none(model, kv, max_tokens: int, scratch_slot: int, device: torch.device,
                    staging=None, pool=None) -> PiecewiseGraphs | None:
    """PiecewiseGraphs over piecewise_buckets(max_tokens), or None with a logged reason (those
    steps then run eager). On the CPU device (tests) the pieces run uncaptured."""
    try:
        return PiecewiseGraphs(model, kv, piecewise_buckets(max_tokens), scratch_slot, device,
                               staging=staging, pool=pool, capture=device.type == "cuda")
    except Exception as exc:  # capture failures come from many layers (torch, FlashInfer, Triton)
        log.warning("piecewise CUDA graph capture failed, prefill and mixed steps run eager: %r",
                    exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
