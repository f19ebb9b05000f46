"""Token sampling on the backend's device, shared by the torch backends (cpu, cuda, rocm).

`sample(logits [S, V], rows) -> ForwardOutput`, in vLLM v1's order: logprobs of the raw logits;
logit_bias; repetition, frequency and presence penalties; greedy rows take the argmax; the other
rows divide by their temperature, keep the tokens that min_p, top_k and top_p allow (top_p over the
distribution renormalised after the other two) and draw by inverse CDF.

Kept-set semantics: each filter keeps {v : p_v >= theta} for one threshold per row, so ties at a cut
are all kept (vLLM keeps top-k ties too; its top-p keeps whichever tied tokens its sort put first).
The kept tokens are walked in vocabulary order when drawing, so the token a uniform selects does not
depend on how a sort ordered ties, nor on which strategy found theta.

Randomness: one uniform per row, a splitmix64 hash of (seed, step, draw) computed on the host, so a
row's token depends on its own logits, parameters, seed and step only, never on the batch.

Strategies for theta. On an accelerator (`exact_sort`): one sort of the filtered rows, no
data-dependent host sync. On CPU a sort of 262144 floats costs ~40 ms, so the top
`_CANDIDATES` probabilities (topk) settle min_p/top_k/top_p whenever the cut lies among them
(the usual case for a trained model); a nucleus wider than that is drawn by rejection: propose from
the min_p/top_k-filtered distribution and accept iff the token's exclusive mass from the top is below
top_p (exact, accepted with probability >= top_p). A row still unresolved after `_MAX_DRAWS` falls
back to the sort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from localserve.engine.plan import ForwardOutput, SamplingRow
from localserve.errors import InvalidRequestError

_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below it are greedy
_CANDIDATES = 256
_MAX_DRAWS = 64
_REJECTION_MIN_TOP_P = 0.25  # below it a nucleus is likely narrow: try the candidates first
_BLOCK = 1024  # block size of the two-level inverse CDF
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def uniform(seed: int, step: int, draw: int = 0) -> float:
    """A uniform in [0, 1) that is a pure function of (seed, step, draw)."""
    h = _mix64((_mix64(seed & _M64) + (step + 1) * _GOLDEN) & _M64)
    h = _mix64((h + draw * _GOLDEN) & _M64)
    return (h >> 11) * (1.0 / (1 << 53))


@dataclass(slots=True)
class BatchParams:
    """Per-row sampling parameters as host arrays, normalised (top_k 0 = off, greedy flag)."""

    temperature: np.ndarray  # float64 [S]
    top_k: np.ndarray  # int64 [S], 0 = off (also when >= V)
    top_p: np.ndarray  # float64 [S]
    min_p: np.ndarray  # float64 [S]
    greedy: np.ndarray  # bool [S]
    penalised: np.ndarray  # bool [S]
    biased: np.ndarray  # bool [S]
    num_logprobs: np.ndarray  # int64 [S]: -1 = no logprobs, else top-K asked
    seed: list[int]
    step: list[int]

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], vocab_size: int) -> BatchParams:
        ps = [r.params for r in rows]
        top_k = np.array([p.top_k for p in ps], dtype=np.int64)
        top_k[(top_k < 0) | (top_k >= vocab_size)] = 0
        return cls(
            temperature=np.array([p.temperature for p in ps], dtype=np.float64),
            top_k=top_k,
            top_p=np.array([p.top_p for p in ps], dtype=np.float64),
            min_p=np.array([p.min_p for p in ps], dtype=np.float64),
            greedy=np.array([p.temperature < _GREEDY_EPS for p in ps], dtype=bool),
            penalised=np.array([p.needs_penalties for p in ps], dtype=bool),
            biased=np.array([bool(p.logit_bias) for p in ps], dtype=bool),
            num_logprobs=np.array(
                [p.num_top_logprobs if p.logprobs else -1 for p in ps], dtype=np.int64
            ),
            seed=[r.seed for r in rows],
            step=[r.step for r in rows],
        )

    def uniforms(self, rows: np.ndarray, draw: int = 0) -> np.ndarray:
        return np.array([uniform(self.seed[i], self.step[i], draw) for i in rows])


def sample(
    logits: torch.Tensor, rows: Sequence[SamplingRow], *, exact_sort: bool | None = None
) -> ForwardOutput:
    """Sample one token per row of `logits` [S, V] (fp32 or bf16, any device).

    Only the [S] token ids (and [S] / [S, K] logprobs when a row asks) are copied to the host.
    `exact_sort` picks the threshold strategy; default: sort on accelerators, topk on CPU.
    """
    assert logits.ndim == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return ForwardOutput(token_ids=np.zeros(0, dtype=np.int64))
    if exact_sort is None:
        exact_sort = logits.device.type != "cpu"
    batch = BatchParams.from_rows(rows, vocab_size)
    raw = logits if logits.dtype == torch.float32 else logits.float()
    wants_logprobs = bool((batch.num_logprobs >= 0).any())
    modified = bool(batch.penalised.any() or batch.biased.any())

    if batch.greedy.all() and not modified:  # fast path: no [S, V] work but the argmax
        token_ids = raw.argmax(dim=-1)
    else:
        x = raw
        if modified:
            # raw stays intact for the logprobs; a bf16 input's fp32 copy is ours to modify
            x = raw.clone() if (raw is logits or wants_logprobs) else raw
            _apply_logit_bias(x, rows, np.flatnonzero(batch.biased))
            _apply_penalties(x, rows, batch, np.flatnonzero(batch.penalised))
        token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        greedy_idx = np.flatnonzero(batch.greedy)
        random_idx = np.flatnonzero(~batch.greedy)
        if len(greedy_idx):
            token_ids[_index(greedy_idx, x)] = _take(x, greedy_idx).argmax(dim=-1)
        if len(random_idx):
            token_ids[_index(random_idx, x)] = _sample_random(
                _take(x, random_idx), batch, random_idx, exact_sort
            )
    out = ForwardOutput(token_ids=token_ids.cpu().numpy().astype(np.int64, copy=False))
    if wants_logprobs:
        _fill_logprobs(out, raw, token_ids, batch)
    return out


def penalized_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """An fp32 copy of logits with each row's logit_bias and penalties applied: what greedy rows
    take the argmax of and what temperature divides."""
    batch = BatchParams.from_rows(rows, logits.shape[1])
    x = logits.float().clone()
    _apply_logit_bias(x, rows, np.flatnonzero(batch.biased))
    _apply_penalties(x, rows, batch, np.flatnonzero(batch.penalised))
    return x


def _index(idx: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(idx).to(like.device)


def _take(x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """Rows idx of x, without a copy when idx is every row in order."""
    if len(idx) == x.shape[0] and (idx == np.arange(len(idx))).all():
        return x
    return x.index_select(0, _index(idx, x))


# ----------------------------------------------------------------------------- bias, penalties


def _apply_logit_bias(x: torch.Tensor, rows: Sequence[SamplingRow], idx: np.ndarray) -> None:
    if not len(idx):
        return
    r, t, b = [], [], []
    for i in idx:
        bias = rows[i].params.logit_bias
        r.extend([i] * len(bias))
        t.extend(int(tok) for tok in bias)
        b.extend(float(v) for v in bias.values())
    toks = np.array(t, dtype=np.int64)
    if toks.min() < 0 or toks.max() >= x.shape[1]:
        bad = int(toks[(toks < 0) | (toks >= x.shape[1])][0])
        raise InvalidRequestError(f"logit_bias token {bad} is outside the vocabulary [0, {x.shape[1]})")
    rows_t = _index(np.array(r, dtype=np.int64), x)
    x.index_put_((rows_t, _index(toks, x)), torch.tensor(b, dtype=x.dtype, device=x.device), accumulate=True)


def _apply_penalties(
    x: torch.Tensor, rows: Sequence[SamplingRow], batch: BatchParams, idx: np.ndarray
) -> None:
    """Sparse over the tokens each row has seen: (row, token) pairs are unique, so index_put is exact."""
    if not len(idx):
        return
    r, t, c, rep, freq, pres = [], [], [], [], [], []
    for i in idx:
        prm = rows[i].params
        out = np.asarray(rows[i].output_token_ids or (), dtype=np.int64)
        toks, counts = np.unique(out, return_counts=True)
        if prm.repetition_penalty != 1.0 and rows[i].prompt_token_ids:
            # the repetition penalty also covers prompt tokens, with an output count of 0
            prompt_only = np.setdiff1d(np.asarray(rows[i].prompt_token_ids, dtype=np.int64), toks)
            toks = np.concatenate([toks, prompt_only])
            counts = np.concatenate([counts, np.zeros(len(prompt_only), dtype=counts.dtype)])
        n = len(toks)
        r.append(np.full(n, i, dtype=np.int64))
        t.append(toks)
        c.append(counts)
        rep.append(np.full(n, prm.repetition_penalty))
        freq.append(np.full(n, prm.frequency_penalty))
        pres.append(np.full(n, prm.presence_penalty))
    toks = np.concatenate(t)
    if not len(toks):
        return
    assert toks.min() >= 0 and toks.max() < x.shape[1], "token id outside the vocabulary"

    def dev(a: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(a).astype(np.float32)).to(x.device)

    where = (_index(np.concatenate(r), x), _index(toks, x))
    vals = x[where]
    p_rep, count = dev(rep), dev(c)
    vals = torch.where(vals > 0, vals / p_rep, vals * p_rep)
    vals = vals - dev(freq) * count - dev(pres) * (count > 0).float()
    x.index_put_(where, vals)


# ----------------------------------------------------------------------------- random rows


def _sample_random(
    x: torch.Tensor, batch: BatchParams, idx: np.ndarray, exact_sort: bool
) -> torch.Tensor:
    """Token ids [R] for the non-greedy rows idx (x holds exactly those rows)."""
    dev = x.device
    temperature = batch.temperature[idx]
    z = x if (temperature == 1.0).all() else x * _t(1.0 / temperature, dev)[:, None]
    probs = torch.softmax(z, dim=-1)  # a fresh tensor: the paths below mask it in place
    u0 = _t(batch.uniforms(idx), dev)
    top_k, top_p, min_p = batch.top_k[idx], batch.top_p[idx], batch.min_p[idx]
    if exact_sort:
        return _sample_sorted(probs, u0, top_k, top_p, min_p)
    return _sample_cpu(probs, u0, batch, idx, top_k, top_p, min_p)


def _sample_sorted(
    probs: torch.Tensor, u0: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray
) -> torch.Tensor:
    """Accelerator path: one sort of the rows, vectorised masks, no data-dependent host sync."""
    num, vocab = probs.shape
    if ((top_k > 0) | (top_p < 1.0)).any():
        cand, _ = probs.sort(dim=-1, descending=True)
        theta0 = _pre_threshold(cand, top_k, min_p)
        theta = _nucleus_threshold(cand, np.full(num, vocab), top_p, theta0, None)
        probs = probs * (probs >= theta[:, None])
    elif (min_p > 0).any():
        probs = probs * (probs >= (_t(min_p, probs.device) * probs.amax(dim=-1))[:, None])
    return _draw(probs, u0)


def _sample_cpu(
    probs: torch.Tensor,
    u0: torch.Tensor,
    batch: BatchParams,
    idx: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    min_p: np.ndarray,
) -> torch.Tensor:
    """CPU path. Each row's route depends on its own parameters and probabilities only:
    * top_k, or a small top_p: topk candidates settle theta; draw among them when the kept set
      lies inside, else mask the row by theta (ties past the candidates) or, when the nucleus is
      wider than the candidates, fall through to rejection;
    * other top_p rows: rejection from the min_p-masked row, no ranking at all;
    * the rest: a min_p mask (if any) and a plain draw.
    """
    num, vocab = probs.shape
    dev = probs.device
    tokens = torch.empty(num, dtype=torch.long, device=dev)
    # min_p's threshold, rounded as the float32 product the sorted path computes
    theta = min_p.astype(np.float32) * probs.amax(dim=-1).cpu().numpy()
    lower = np.full(num, np.inf, dtype=np.float32)  # tokens >= lower are surely in the nucleus
    by_cand = (top_k > 0) | (top_p < _REJECTION_MIN_TOP_P)
    rejection = ~by_cand & (top_p < 1.0)
    plain = ~by_cand & (top_p >= 1.0)

    rows = np.flatnonzero(by_cand)
    if len(rows):
        sel = _index(rows, probs)
        k_row = np.minimum(np.maximum(_CANDIDATES, top_k[rows]), vocab)
        cand, cand_ids = _take(probs, rows).topk(int(min(vocab, k_row.max() + 1)), dim=-1)
        theta0 = _pre_threshold(cand, top_k[rows], min_p[rows])
        th = _nucleus_threshold(
            cand, k_row, top_p[rows], theta0, lambda i, t: _mass_at_least(probs[rows[i]], t)
        )
        after = _col(cand, np.minimum(k_row, cand.shape[1] - 1))  # best p past the trusted ones
        th_h, after_h = th.cpu().numpy(), after.cpu().numpy()
        known = np.isfinite(th_h)
        fits = known & ((k_row == vocab) | (after_h < th_h))
        if fits.any():  # kept set inside the candidates: draw among them in vocabulary order
            f = _index(np.flatnonzero(fits), probs)
            ids, order = cand_ids[f].sort(dim=-1)
            w = cand[f] * (cand[f] >= th[f][:, None])
            pos = _draw(w.gather(1, order), u0[sel[f]])
            tokens[sel[f]] = ids.gather(1, pos[:, None]).squeeze(1)
        plain[rows[known & ~fits]] = True  # ties or a large top_k reach past the candidates
        theta[rows[known]] = th_h[known]
        opened = rows[~known]  # nucleus wider than the candidates
        rejection[opened] = True
        theta[opened] = theta0.cpu().numpy()[~known]
        lower[opened] = _col(cand, k_row - 1).cpu().numpy()[~known]

    masked = np.flatnonzero((plain | rejection) & (theta > 0))
    for i in masked:  # in place: tokens below theta are never kept by any later stage
        F.threshold_(probs[i], _below(theta[i]), 0.0)
    rows = np.flatnonzero(plain)
    if len(rows):
        tokens[_index(rows, probs)] = _draw(_take(probs, rows), u0[_index(rows, probs)])
    rows = np.flatnonzero(rejection)
    if len(rows):
        tokens[_index(rows, probs)] = _nucleus_by_rejection(
            _take(probs, rows), lower[rows], top_p[rows], batch, idx[rows], u0[_index(rows, probs)]
        )
    return tokens


def _pre_threshold(cand: torch.Tensor, top_k: np.ndarray, min_p: np.ndarray) -> torch.Tensor:
    """theta0 [R]: min_p and top_k as one threshold, from probabilities sorted descending."""
    dev = cand.device
    theta0 = _t(min_p, dev) * cand[:, 0]
    kth = _col(cand, np.maximum(top_k - 1, 0))
    return torch.where(_t(top_k > 0, dev), torch.maximum(theta0, kth), theta0)


def _nucleus_threshold(
    cand: torch.Tensor,
    k_row: np.ndarray,
    top_p: np.ndarray,
    theta0: torch.Tensor,
    mass_of_row: Callable[[int, float], torch.Tensor] | None,
) -> torch.Tensor:
    """theta [R]: theta0 tightened by top_p over the distribution renormalised to {p >= theta0}.

    `cand` holds each row's top probabilities sorted descending; row i trusts its first k_row[i].
    NaN where the nucleus reaches past them. `mass_of_row(i, theta0_i)` gives the mass of
    {p >= theta0_i} over the whole row when that set reaches past the trusted candidates (never
    when k_row == V, the only case without it).
    """
    if not (top_p < 1.0).any():
        return theta0
    dev = cand.device
    width = cand.shape[1]
    trusted = torch.arange(width, device=dev)[None, :] < _t(k_row, dev)[:, None]
    w = cand * ((cand >= theta0[:, None]) & trusted)
    cs = w.cumsum(dim=-1)
    top_mass = _col(cs, k_row - 1)
    mass = top_mass.clone()  # mass of {p >= theta0}
    if mass_of_row is not None:
        spills = (_col(cand, np.minimum(k_row, width - 1)) >= theta0) & _t(k_row < width, dev)
        theta0_h = theta0.cpu().numpy()
        for i in np.flatnonzero(spills.cpu().numpy()):
            mass[i] = mass_of_row(int(i), float(theta0_h[i]))
    limit = _t(top_p, dev) * mass
    # vLLM's rule: keep a token while the mass strictly above it is below top_p (the top token
    # always); `keep` is a prefix because the exclusive cumsum only grows
    keep = ((cs - w) < limit[:, None]) & (w > 0)
    cut = cand.gather(1, (keep.sum(dim=-1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
    theta = torch.where(top_mass >= limit, torch.maximum(theta0, cut), torch.full_like(cut, float("nan")))
    return torch.where(_t(top_p < 1.0, dev), theta, theta0)


def _nucleus_by_rejection(
    probs: torch.Tensor,
    lower: np.ndarray,
    top_p: np.ndarray,
    batch: BatchParams,
    idx: np.ndarray,
    u0: torch.Tensor,
) -> torch.Tensor:
    """Draw from the top_p nucleus of each row of `probs` (already masked to {p >= theta0}).

    Proposals come from the row itself; a token is in the nucleus iff the mass strictly above it
    is below top_p times the row's mass (tokens >= lower always are). Draw j uses the uniform
    hash(seed, step, j), so the accepted token stays a pure function of the row; each draw is
    accepted with probability >= top_p.
    """
    dev = probs.device
    limit = top_p * probs.sum(dim=-1).cpu().numpy()
    tokens = torch.full((probs.shape[0],), -1, dtype=torch.long, device=dev)
    pending = np.arange(probs.shape[0])
    for draw in range(_MAX_DRAWS):
        sel = _index(pending, probs)
        u = u0[sel] if draw == 0 else _t(batch.uniforms(idx[pending], draw), dev)
        tok = _draw(_take(probs, pending), u)
        p_tok = probs[sel, tok].cpu().numpy()
        ok = np.array([
            p_tok[j] >= lower[i] or float(F.threshold(probs[i], float(p_tok[j]), 0.0).sum()) < limit[i]
            for j, i in enumerate(pending)
        ], dtype=bool)
        done = _index(np.flatnonzero(ok), probs)
        tokens[sel[done]] = tok[done]
        pending = pending[~ok]
        if not len(pending):
            return tokens
    # rare (a narrow nucleus in a flat distribution): settle the rest exactly with a sort and a
    # fresh uniform (the earlier ones are conditioned on their rejection)
    sel = _index(pending, probs)
    p = probs[sel]
    cand, _ = p.sort(dim=-1, descending=True)
    zero = torch.zeros(len(pending), device=dev)
    theta = _nucleus_threshold(cand, np.full(len(pending), p.shape[1]), top_p[pending], zero, None)
    u = _t(batch.uniforms(idx[pending], _MAX_DRAWS), dev)
    tokens[sel] = _draw(p * (p >= theta[:, None]), u)
    return tokens


# ----------------------------------------------------------------------------- helpers


def _t(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a)).to(dev)


def _col(a: torch.Tensor, cols: np.ndarray) -> torch.Tensor:
    """a[i, cols[i]] for every row i."""
    return a.gather(1, _t(cols, a.device)[:, None]).squeeze(1)


def _below(theta: float) -> float:
    """The float32 just below theta: F.threshold keeps p > it, i.e. p >= theta."""
    return float(np.nextafter(np.float32(theta), np.float32(-np.inf)))


def _mass_at_least(p: torch.Tensor, theta: float) -> torch.Tensor:
    return F.threshold(p, _below(theta), 0.0).sum()


def _draw(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over nonnegative weights [R, N] in column order: positions [R] for uniforms u.

    Two levels so no [R, N] cumsum is needed: block sums pick the block holding u * total, then
    a cumsum inside that block picks the token.
    """
    num, width = w.shape
    if width <= 4 * _BLOCK:
        cs = w.cumsum(dim=-1)
        return _search(cs, u.to(cs.dtype) * cs[:, -1])
    nb = width // _BLOCK
    head = nb * _BLOCK
    sums = w[:, :head].unflatten(1, (nb, _BLOCK)).sum(dim=-1)
    if head < width:
        sums = torch.cat([sums, w[:, head:].sum(dim=-1, keepdim=True)], dim=1)
    bcs = sums.cumsum(dim=-1)
    target = u.to(bcs.dtype) * bcs[:, -1]
    block = _search(bcs, target)
    before = bcs.gather(1, block[:, None]).squeeze(1) - sums.gather(1, block[:, None]).squeeze(1)
    cols = block[:, None] * _BLOCK + torch.arange(_BLOCK, device=w.device)[None, :]
    inner = w.gather(1, cols.clamp(max=width - 1)) * (cols < width)
    return block * _BLOCK + _search(inner.cumsum(dim=-1), target - before)


def _search(cs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The first position whose inclusive cumsum exceeds target, never a zero-weight one.

    Rounding can push target below 0 (a remainder inside a block) or up to the total; clamping
    it at 0 and the result at the first position reaching the total (the last positive weight)
    keeps zero-weight tokens unreachable.
    """
    total = cs[:, -1:].contiguous()
    pos = torch.searchsorted(cs, target.clamp(min=0.0)[:, None].contiguous(), right=True)
    last = torch.searchsorted(cs, total, right=False)
    return torch.minimum(pos, last).squeeze(1)


# ----------------------------------------------------------------------------- logprobs


def _fill_logprobs(
    out: ForwardOutput, raw: torch.Tensor, token_ids: torch.Tensor, batch: BatchParams
) -> None:
    """log_softmax of the raw logits, only for the rows that asked; other rows hold NaN / -1."""
    idx = np.flatnonzero(batch.num_logprobs >= 0)
    rows = _take(raw, idx)
    sel = _index(idx, raw)
    lse = torch.logsumexp(rows, dim=-1, keepdim=True)
    lp = (rows.gather(1, token_ids[sel][:, None]) - lse).squeeze(1)
    num = raw.shape[0]
    out.logprobs = np.full(num, np.nan, dtype=np.float32)
    out.logprobs[idx] = lp.cpu().numpy()
    k = int(batch.num_logprobs.max())
    if k > 0:
        vals, ids = rows.topk(k, dim=-1)
        out.top_ids = np.full((num, k), -1, dtype=np.int64)
        out.top_logprobs = np.full((num, k), np.nan, dtype=np.float32)
        out.top_ids[idx] = ids.cpu().numpy()
        out.top_logprobs[idx] = (vals - lse).cpu().numpy()
