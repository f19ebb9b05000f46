"""Token sampling on the backend's device, shared by the torch backends (cpu, cuda, rocm).

`sample(logits [S, V], rows) -> ForwardOutput`, in vLLM v1's order: the grammar bitmask of
constrained rows (disallowed tokens to -inf, so their logprobs are under the masked distribution,
as in vLLM v1); logprobs of those logits; logit_bias; repetition, frequency and presence penalties; greedy rows take the argmax; the other
rows divide by their temperature, keep the tokens that min_p, top_k and top_p allow (top_p over
the distribution renormalised after the other two) and draw by inverse CDF.

Kept-set semantics: each filter keeps {v : p_v >= theta} for one threshold per row, so ties at a
cut are all kept (vLLM keeps top-k ties too; its top-p keeps whichever tied tokens its sort put
first). Kept tokens are walked in vocabulary order when drawing, so the token a uniform selects
depends neither on how a sort ordered ties nor on which route found theta.

Randomness: one uniform per row, a splitmix64 hash of (seed, step, draw) computed on the host, so
a row's token depends on its own logits, parameters, seed and step only, never on the batch.

Routes to theta. On an accelerator (`exact_sort`): one sort of the rows, no data-dependent host
sync. On CPU a sort of 262144 floats costs ~40 ms, so: top_k rows and small-top_p rows read theta
off their top `_CANDIDATES` probabilities (block-wise topk); other top_p rows draw by rejection:
propose from the row and accept iff the mass strictly above the token is below top_p (exact; each
draw accepted with probability >= top_p); a row still unresolved after `_MAX_DRAWS` is sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from localserve.backends.torch_common import sampling_kernels as K
# sample() looks this name up here at each call (the grammar bench times it by patching it)
from localserve.backends.torch_common.token_bitmask import apply_token_bitmask, unpack_bitmask  # noqa: F401
from localserve.engine.plan import ForwardOutput, SamplingRow
from localserve.engine.sampling_params import GREEDY_EPS
from localserve.errors import InvalidRequestError

_CANDIDATES = 256
_MAX_DRAWS = 64
_REJECTION_MIN_TOP_P = 0.25  # below it a nucleus is likely narrow: try the candidates first


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
            greedy=np.array([p.temperature < GREEDY_EPS for p in ps], dtype=bool),
            penalised=np.array([p.needs_penalties for p in ps], dtype=bool),
            biased=np.array([bool(p.logit_bias) for p in ps], dtype=bool),
            num_logprobs=np.array(
                [p.num_top_logprobs if p.logprobs else -1 for p in ps], dtype=np.int64
            ),
            seed=[r.seed for r in rows],
            step=[r.step for r in rows],
        )

    def uniforms(self, rows: np.ndarray, draw: int = 0) -> np.ndarray:
        return np.array([K.uniform(self.seed[i], self.step[i], draw) for i in rows])


def sample(
    logits: torch.Tensor, rows: Sequence[SamplingRow], *, exact_sort: bool | None = None,
    argmax_only: bool = False,
) -> ForwardOutput:
    """Sample one token per row of `logits` [S, V] (fp32 or bf16, any device); logits is not
    modified. Only the [S] token ids (and [S] / [S, K] logprobs when a row asks) reach the host.
    `exact_sort` picks the route to the thresholds; default: sort on accelerators only.
    `argmax_only` (Plan.argmax_only): every row is known to take the argmax, rows unread.
    """
    assert logits.ndim == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return ForwardOutput(token_ids=np.zeros(0, dtype=np.int64))
    if argmax_only:
        return ForwardOutput(token_ids=K.argmax(logits).cpu().numpy().astype(np.int64, copy=False))
    if exact_sort is None:
        exact_sort = logits.device.type != "cpu"
    logits = apply_token_bitmask(logits, rows)
    batch = BatchParams.from_rows(rows, vocab_size)
    modified = bool(batch.penalised.any() or batch.biased.any())

    if batch.greedy.all() and not modified:  # fast path: no [S, V] work but the argmax
        token_ids = K.argmax(logits)
    else:
        x = logits
        if modified:
            x = logits.float()
            x = x.clone() if x is logits else x
            _apply_logit_bias(x, rows, np.flatnonzero(batch.biased))
            _apply_penalties(x, rows, np.flatnonzero(batch.penalised))
        token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        greedy_idx = np.flatnonzero(batch.greedy)
        random_idx = np.flatnonzero(~batch.greedy)
        if len(greedy_idx):
            sel = _index(greedy_idx, x)
            token_ids[sel] = K.argmax(x, None if len(greedy_idx) == num_rows else sel)
        if len(random_idx):
            probs = _probabilities(x, random_idx, batch.temperature[random_idx])
            token_ids[_index(random_idx, x)] = _sample_random(probs, batch, random_idx, exact_sort)
    out = ForwardOutput(token_ids=token_ids.cpu().numpy().astype(np.int64, copy=False))
    if (batch.num_logprobs >= 0).any():
        _fill_logprobs(out, logits, token_ids, batch)
    return out


def penalized_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """An fp32 copy of logits with each row's logit_bias and penalties applied: what greedy rows
    take the argmax of and what temperature divides."""
    batch = BatchParams.from_rows(rows, logits.shape[1])
    x = logits.float().clone()
    _apply_logit_bias(x, rows, np.flatnonzero(batch.biased))
    _apply_penalties(x, rows, np.flatnonzero(batch.penalised))
    return x


def _index(idx: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(like.device)


def _t(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    """Host array to device; float64 becomes float32, the dtype every comparison here uses."""
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
    outside = (toks < 0) | (toks >= x.shape[1])
    if outside.any():
        raise InvalidRequestError(
            f"logit_bias token {int(toks[outside][0])} is outside the vocabulary [0, {x.shape[1]})"
        )
    where = (_index(np.array(r), x), _index(toks, x))
    x.index_put_(where, torch.tensor(b, dtype=x.dtype, device=x.device), accumulate=True)


def _apply_penalties(x: torch.Tensor, rows: Sequence[SamplingRow], idx: np.ndarray) -> None:
    """Sparse over the tokens each row has seen; no [S, V] count tensor is built.

    Two stages, in vLLM's order: the repetition penalty over prompt + output tokens (duplicate
    (row, token) pairs are fine: every copy writes the same value, so the prompt needs no
    dedup), then frequency and presence over the distinct output tokens with their counts.
    """
    if not len(idx):
        return
    rep_r, rep_t, rep_v, out_r, out_t, out_c, freq, pres = ([] for _ in range(8))
    for i in idx:
        prm = rows[i].params
        out = np.asarray(rows[i].output_token_ids or (), dtype=np.int64)
        if prm.repetition_penalty != 1.0:
            seen = np.concatenate([np.asarray(rows[i].prompt_token_ids or (), dtype=np.int64), out])
            rep_r.append(np.full(len(seen), i))
            rep_t.append(seen)
            rep_v.append(np.full(len(seen), prm.repetition_penalty))
        if prm.frequency_penalty != 0.0 or prm.presence_penalty != 0.0:
            toks, counts = np.unique(out, return_counts=True)
            out_r.append(np.full(len(toks), i))
            out_t.append(toks)
            out_c.append(counts)
            freq.append(np.full(len(toks), prm.frequency_penalty))
            pres.append(np.full(len(toks), prm.presence_penalty))
    dev = x.device
    for toks in (rep_t, out_t):
        if toks and len(cat := np.concatenate(toks)):
            assert cat.min() >= 0 and cat.max() < x.shape[1], "token id outside the vocabulary"
    if rep_t and len(np.concatenate(rep_t)):
        where = (_index(np.concatenate(rep_r), x), _index(np.concatenate(rep_t), x))
        vals, p = x[where], _t(np.concatenate(rep_v), dev)
        x.index_put_(where, torch.where(vals > 0, vals / p, vals * p))
    if out_t and len(np.concatenate(out_t)):
        where = (_index(np.concatenate(out_r), x), _index(np.concatenate(out_t), x))
        count = _t(np.concatenate(out_c).astype(np.float32), dev)
        vals = x[where] - _t(np.concatenate(freq), dev) * count
        x.index_put_(where, vals - _t(np.concatenate(pres), dev) * (count > 0).float())


# ----------------------------------------------------------------------------- random rows


def _probabilities(x: torch.Tensor, idx: np.ndarray, temperature: np.ndarray) -> torch.Tensor:
    """softmax(x[idx] / temperature) as a new fp32 [R, V] tensor that the routes mask in place.

    On CPU it lives in the reused scratch buffer and the softmax runs in place, over all rows at
    once (threads split rows), so no [R, V] temporary is made."""
    num, vocab = len(idx), x.shape[1]
    inv_t = _t(1.0 / temperature, x.device)[:, None]
    scaled = not (temperature == 1.0).all()
    if x.device.type != "cpu":
        z = x[_index(idx, x)].float()
        return torch.softmax(z * inv_t if scaled else z, dim=-1)
    out = K.scratch(num, vocab)
    if num == x.shape[0]:  # idx is every row, in order
        if not scaled:
            return torch.softmax(x, dim=-1, dtype=torch.float32, out=out)
        if x.dtype == torch.float32:
            return torch.softmax(torch.mul(x, inv_t, out=out), dim=-1, out=out)
    for j, i in enumerate(idx):
        out[j].copy_(x[i])  # converts bf16
    if scaled:
        out.mul_(inv_t)
    return torch.softmax(out, dim=-1, out=out)


def _sample_random(
    probs: torch.Tensor, batch: BatchParams, idx: np.ndarray, exact_sort: bool
) -> torch.Tensor:
    """Token ids [R] for the non-greedy rows idx, whose probabilities `probs` holds."""
    u0 = _t(batch.uniforms(idx), probs.device)
    top_k, top_p, min_p = batch.top_k[idx], batch.top_p[idx], batch.min_p[idx]
    if exact_sort:
        return _sample_sorted(probs, u0, top_k, top_p, min_p)
    return _sample_cpu(probs, u0, batch, idx, top_k, top_p, min_p)


def _sample_sorted(
    probs: torch.Tensor, u0: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray
) -> torch.Tensor:
    """Accelerator route: one sort of the rows, vectorised masks, no data-dependent host sync."""
    num, vocab = probs.shape
    if ((top_k > 0) | (top_p < 1.0)).any():
        cand, _ = probs.sort(dim=-1, descending=True)
        theta0 = _pre_threshold(cand, top_k, min_p)
        theta = _nucleus_threshold(cand, np.full(num, vocab), top_p, theta0, None)
        probs = probs * (probs >= theta[:, None])
    elif (min_p > 0).any():
        probs = probs * (probs >= (_t(min_p, probs.device) * probs.amax(dim=-1))[:, None])
    return K.draw(probs, u0)


def _sample_cpu(
    probs: torch.Tensor,
    u0: torch.Tensor,
    batch: BatchParams,
    idx: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    min_p: np.ndarray,
) -> torch.Tensor:
    """CPU route. Each row's way depends on its own parameters and probabilities only:
    * top_k or a small top_p: topk candidates give theta; draw among them when the kept set lies
      inside, else mask the row by theta (ties past the candidates), or, when the nucleus is wider
      than the candidates, go on to rejection;
    * other top_p rows: rejection from the min_p-masked row, no ranking at all;
    * the rest: a min_p mask (if any) and a plain draw.
    """
    num, vocab = probs.shape
    dev = probs.device
    tokens = torch.empty(num, dtype=torch.long, device=dev)
    # min_p's threshold, rounded as the float32 product the sorted route computes
    theta = min_p.astype(np.float32) * probs.amax(dim=-1).cpu().numpy()
    lower = np.full(num, np.inf, dtype=np.float32)  # tokens >= lower are surely in the nucleus
    by_cand = (top_k > 0) | (top_p < _REJECTION_MIN_TOP_P)
    rejection = ~by_cand & (top_p < 1.0)
    plain = ~by_cand & (top_p >= 1.0)

    rows = np.flatnonzero(by_cand)
    if len(rows):
        sel = _index(rows, probs)
        k_row = np.minimum(np.maximum(_CANDIDATES, top_k[rows]), vocab)
        cand, cand_ids = K.topk(probs, int(min(vocab, k_row.max() + 1)), sel)
        theta0 = _pre_threshold(cand, top_k[rows], min_p[rows])

        def mass_of_row(i: int, t: float) -> torch.Tensor:
            return F.threshold(probs[rows[i]], _below(t), 0.0).sum()

        th = _nucleus_threshold(cand, k_row, top_p[rows], theta0, mass_of_row).cpu().numpy()
        after = _col(cand, np.minimum(k_row, cand.shape[1] - 1)).cpu().numpy()  # best p past them
        known = np.isfinite(th)
        fits = known & ((k_row == vocab) | (after < th))
        if fits.any():  # kept set inside the candidates: draw among them in vocabulary order
            f = _index(np.flatnonzero(fits), probs)
            ids, order = cand_ids[f].sort(dim=-1)
            w = cand[f].gather(1, order)
            w = w * (w >= _t(th[fits], dev)[:, None])
            tokens[sel[f]] = ids.gather(1, K.draw(w, u0[sel[f]])[:, None]).squeeze(1)
        plain[rows[known & ~fits]] = True  # ties or a large top_k reach past the candidates
        theta[rows[known]] = th[known]
        opened = rows[~known]  # nucleus wider than the candidates
        rejection[opened] = True
        theta[opened] = theta0.cpu().numpy()[~known]
        lower[opened] = _col(cand, k_row - 1).cpu().numpy()[~known]

    for i in np.flatnonzero((plain | rejection) & (theta > 0)):
        F.threshold_(probs[i], _below(theta[i]), 0.0)  # tokens below theta are never kept later
    rows = np.flatnonzero(plain)
    if len(rows):
        sel = _index(rows, probs)
        tokens[sel] = K.draw(probs, u0[sel], None if len(rows) == num else sel)
    rows = np.flatnonzero(rejection)
    if len(rows):
        tokens[_index(rows, probs)] = _nucleus_by_rejection(
            probs, rows, lower[rows], top_p[rows], batch, idx[rows], u0[_index(rows, probs)]
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
    nan = torch.full_like(cut, float("nan"))
    theta = torch.where(top_mass >= limit, torch.maximum(theta0, cut), nan)
    return torch.where(_t(top_p < 1.0, dev), theta, theta0)


def _nucleus_by_rejection(
    probs: torch.Tensor,
    rows: np.ndarray,
    lower: np.ndarray,
    top_p: np.ndarray,
    batch: BatchParams,
    idx: np.ndarray,
    u0: torch.Tensor,
) -> torch.Tensor:
    """Draw from the top_p nucleus of each of `rows` of `probs` (already masked to {p >= theta0}).

    Proposals come from the row itself; a token is in the nucleus iff the mass strictly above it
    is below top_p times the row's mass (tokens >= lower always are). Draw j uses the uniform
    hash(seed, step, j), so the accepted token stays a pure function of the row; each draw is
    accepted with probability >= top_p.
    """
    dev = probs.device
    limit = top_p * probs.sum(dim=-1).cpu().numpy()[rows]
    tokens = torch.full((len(rows),), -1, dtype=torch.long, device=dev)
    pending = np.arange(len(rows))
    for draw in range(_MAX_DRAWS):
        u = u0[_index(pending, u0)] if draw == 0 else _t(batch.uniforms(idx[pending], draw), dev)
        tok = K.draw(probs, u, _index(rows[pending], probs))
        p_tok = probs[_index(rows[pending], probs), tok].cpu().numpy()
        ok = np.array([
            p_tok[j] >= lower[i]
            or float(F.threshold(probs[rows[i]], float(p_tok[j]), 0.0).sum()) < limit[i]
            for j, i in enumerate(pending)
        ], dtype=bool)
        done = _index(np.flatnonzero(ok), tok)
        tokens[_index(pending[ok], tokens)] = tok[done]
        pending = pending[~ok]
        if not len(pending):
            return tokens
    # rare (a narrow nucleus in a flat distribution): settle the rest exactly with a sort and a
    # fresh uniform (the earlier ones are conditioned on their rejection)
    p = probs[_index(rows[pending], probs)]
    cand, _ = p.sort(dim=-1, descending=True)
    zero = torch.zeros(len(pending), device=dev)
    theta = _nucleus_threshold(cand, np.full(len(pending), p.shape[1]), top_p[pending], zero, None)
    u = _t(batch.uniforms(idx[pending], _MAX_DRAWS), dev)
    tokens[_index(pending, tokens)] = K.draw(p * (p >= theta[:, None]), u)
    return tokens


# ----------------------------------------------------------------------------- logprobs


def _fill_logprobs(
    out: ForwardOutput, logits: torch.Tensor, token_ids: torch.Tensor, batch: BatchParams
) -> None:
    """log_softmax of the raw logits for the rows that asked; other rows hold NaN / -1.

    log_softmax is one fused pass (cheaper than logsumexp on CPU); on CPU it runs in place in the
    scratch buffer, free again once the tokens are drawn."""
    idx = np.flatnonzero(batch.num_logprobs >= 0)
    k = int(batch.num_logprobs.max())
    sel = _index(idx, logits)
    if logits.device.type != "cpu":
        logp = torch.log_softmax(logits[sel].float(), dim=-1)
    elif len(idx) == logits.shape[0]:
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=K.scratch(*logits.shape))
    else:
        logp = K.scratch(len(idx), logits.shape[1])
        for j, i in enumerate(idx):
            logp[j].copy_(logits[i])
        logp = torch.log_softmax(logp, dim=-1, out=logp)
    num = logits.shape[0]
    out.logprobs = np.full(num, np.nan, dtype=np.float32)
    out.logprobs[idx] = logp.gather(1, token_ids[sel][:, None]).squeeze(1).cpu().numpy()
    if k:
        top_lp, top_id = K.topk(logp, k)
        out.top_ids = np.full((num, k), -1, dtype=np.int64)
        out.top_logprobs = np.full((num, k), np.nan, dtype=np.float32)
        out.top_ids[idx] = top_id.cpu().numpy()
        out.top_logprobs[idx] = top_lp.cpu().numpy()
