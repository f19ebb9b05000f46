"""The torch sampler against numpy references: greedy, seeded reproducibility, the sampled
distribution (chi-square with fixed seeds), filters, penalties, logit_bias and logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from localserve.backends.torch_common import sampling
from localserve.backends.torch_common import sampling_kernels as K
from localserve.backends.torch_common.sampling import penalized_logits, sample
from localserve.backends.torch_common.sampling_kernels import uniform
from localserve.engine.plan import SamplingRow
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import InvalidRequestError

STRATEGIES = [False, True]  # exact_sort: topk candidates (CPU default) / one sort (accelerators)
# CI runs on CPU; on a machine with a GPU the same tests also run there (exact_sort by default)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def row(seed: int = 0, step: int = 0, prompt=None, output=None, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), seed, step, prompt, output)


# ------------------------------------------------------------------ numpy references


def ref_kept_probs(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The distribution vLLM samples from: min_p and top_k (ties kept), then top_p renormalised."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = p >= min_p * p.max()
    if 0 < top_k < len(p):
        keep &= p >= np.sort(p)[::-1][top_k - 1]
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1.0:
        order = np.argsort(-q, kind="stable")
        above = np.cumsum(q[order]) - q[order]  # mass strictly before each token
        cut = q[order][above < top_p].min()
        q = np.where(q >= cut, q, 0.0)
        q /= q.sum()
    return q


def ref_penalized(logits: np.ndarray, r: SamplingRow) -> np.ndarray:
    p = r.params
    x = logits.astype(np.float32).copy()
    for tok, b in p.logit_bias.items():
        x[tok] += b
    counts = np.bincount(np.asarray(r.output_token_ids or [], dtype=np.int64), minlength=len(x))
    seen = counts > 0
    if r.prompt_token_ids:
        seen[np.asarray(r.prompt_token_ids)] = True
    for v in np.flatnonzero(seen):
        x[v] = x[v] / p.repetition_penalty if x[v] > 0 else x[v] * p.repetition_penalty
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(statistic, critical value at p = 1e-4) over the categories with positive probability."""
    pos = probs > 0
    n = counts.sum()
    expected = probs[pos] * n
    stat = float(((counts[pos] - expected) ** 2 / expected).sum())
    df = int(pos.sum()) - 1
    z = 3.719  # one-sided normal quantile for 1e-4 (Wilson-Hilferty approximation)
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


def draw_many(
    logits_row: torch.Tensor, n: int, exact_sort: bool | None, seed: int = 7, device="cpu", **kw
) -> np.ndarray:
    """n tokens for one distribution: one row per step of a single seeded sequence."""
    rows = [row(seed=seed, step=s, **kw) for s in range(n)]
    x = logits_row.to(device).expand(n, -1)
    return sample(x, rows, exact_sort=exact_sort).token_ids


# ------------------------------------------------------------------ greedy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [5000, 262144])
def test_greedy_is_argmax_and_ties_take_lowest_id(dtype, vocab, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, vocab, generator=g).to(dtype)
    x[3, 10] = x[3, 4000] = 50.0  # a tie: lowest id wins, like torch.argmax
    out = sample(x.to(device), [row(temperature=0.0) for _ in range(6)])
    assert out.token_ids.dtype == np.int64
    np.testing.assert_array_equal(out.token_ids, x.float().argmax(-1).numpy())
    assert out.token_ids[3] == 10
    assert out.logprobs is None and out.top_ids is None


def test_greedy_rows_in_a_mixed_batch_still_take_the_argmax():
    x = torch.randn(8, 3000, generator=torch.Generator().manual_seed(1))
    rows = [row(seed=i, temperature=0.0 if i % 2 else 1.0, top_p=0.9) for i in range(8)]
    out = sample(x, rows)
    np.testing.assert_array_equal(out.token_ids[1::2], x[1::2].argmax(-1).numpy())


def test_empty_batch():
    assert sample(torch.zeros(0, 10), []).token_ids.shape == (0,)


# ------------------------------------------------------------------ reproducibility


def _assorted_rows(seed_base: int) -> list[SamplingRow]:
    kinds = [
        dict(),
        dict(temperature=0.7),
        dict(top_p=0.9),
        dict(top_p=0.3, temperature=1.5),  # flat: nucleus wider than the candidates -> rejection
        dict(top_k=5),
        dict(top_k=300, top_p=0.95),
        dict(min_p=0.05),
        dict(min_p=0.02, top_p=0.8, top_k=50),
        dict(temperature=0.0),
        dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4, top_p=0.95),
        dict(logit_bias={3: 5.0, 7: -100.0}, temperature=0.9),
        dict(logprobs=True, top_logprobs=4, top_k=20),
    ]
    return [
        row(seed=seed_base + i, step=3 + i, prompt=[1, 2, 3, 9], output=[3, 3, 11, 400], **kw)
        for i, kw in enumerate(kinds)
    ]


@pytest.mark.parametrize(
    "device,exact_sort", [("cpu", False), ("cpu", True)] + [(d, None) for d in DEVICES[1:]]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_seed_same_token_whatever_the_batch(device, exact_sort, dtype):
    vocab = 1000
    rows = _assorted_rows(100)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(len(rows), vocab, generator=g) * 3).to(dtype)
    x[3] = x[3] / 6  # flat row
    x = x.to(device)
    before = x.clone()
    batch = sample(x, rows, exact_sort=exact_sort)
    assert torch.equal(x, before), "sample() must not modify the logits"
    alone = [sample(x[i : i + 1], [rows[i]], exact_sort=exact_sort) for i in range(len(rows))]
    np.testing.assert_array_equal(batch.token_ids, [a.token_ids[0] for a in alone])
    perm = np.random.default_rng(0).permutation(len(rows))
    shuffled = sample(x[torch.from_numpy(perm).to(device)], [rows[i] for i in perm], exact_sort=exact_sort)
    np.testing.assert_array_equal(shuffled.token_ids, batch.token_ids[perm])
    # padding the batch with unrelated rows changes nothing either
    noise = torch.randn(5, vocab, generator=g).to(dtype).to(device)
    padded = sample(
        torch.cat([noise, x]), _assorted_rows(900)[:5] + rows, exact_sort=exact_sort
    )
    np.testing.assert_array_equal(padded.token_ids[5:], batch.token_ids)
    np.testing.assert_array_equal(padded.logprobs[5:], batch.logprobs)


def test_seed_and_step_drive_the_draws():
    x = torch.zeros(1, 50)  # uniform: every token is equally likely
    a = draw_many(x, 200, False, seed=1)
    b = draw_many(x, 200, False, seed=1)
    c = draw_many(x, 200, False, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.8
    assert len(set(a.tolist())) > 40  # successive steps differ
    assert uniform(5, 0) != uniform(5, 1) != uniform(6, 0)
    assert all(0.0 <= uniform(s, t) < 1.0 for s in (-1, 0, 2**70) for t in range(5))


def test_strategies_agree_when_the_kept_set_is_found_directly():
    """Where the CPU path finds theta from its candidates (top_k, small top_p) or from p_max
    (min_p), both strategies draw the same uniform over the same kept set in vocabulary order.
    (Wider top_p rows use rejection on CPU: same distribution, different token per uniform.)"""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6000, generator=g) * 4  # peaked: nuclei well inside 256 candidates
    kinds = [dict(top_p=0.2), dict(top_k=40), dict(min_p=0.1), dict(top_p=0.5, top_k=10)]
    rows = [row(seed=i, step=i, **kw) for i, kw in enumerate(kinds * 16)]
    np.testing.assert_array_equal(
        sample(x, rows, exact_sort=False).token_ids, sample(x, rows, exact_sort=True).token_ids
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probabilities_are_the_tempered_softmax(dtype):
    """Computed in place in a reused buffer on CPU: exactly softmax(x * float32(1 / T))."""
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(6, 3000, generator=g) * 3).to(dtype)
    for temps, idx in (([1.0] * 6, range(6)), ([0.7, 1.0, 2.0, 0.5, 1.0, 1.3], range(6)), ([0.7, 1.0], [1, 4])):
        temps, idx = np.array(temps), np.array(list(idx))
        inv_t = torch.from_numpy((1.0 / temps).astype(np.float32))[:, None]
        ref = torch.softmax(x[torch.from_numpy(idx)].float() * inv_t, dim=-1)
        got = sampling._probabilities(x, idx, temps).clone()
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


# ------------------------------------------------------------------ distributions

SMALL = torch.tensor([[2.0, 1.5, 1.4, 1.0, 0.5, 0.0, -0.3, -1.0, 0.9, 1.2]])


@pytest.mark.parametrize(
    "device,exact_sort", [("cpu", False), ("cpu", True)] + [(d, None) for d in DEVICES[1:]]
)
@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.6),
        dict(temperature=2.5),
        dict(top_k=4),
        dict(top_p=0.7),
        dict(min_p=0.3),
        dict(top_k=6, top_p=0.8, min_p=0.15, temperature=1.3),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_sampled_frequencies_match_the_filtered_softmax(device, exact_sort, kw):
    n = 20000
    counts = np.bincount(draw_many(SMALL, n, exact_sort, device=device, **kw), minlength=SMALL.shape[1])
    probs = ref_kept_probs(SMALL[0].numpy(), **kw)
    assert (counts[probs == 0] == 0).all(), "a filtered-out token was sampled"
    assert (counts[probs > 0] > 0).all(), "a kept token was never sampled"
    stat, crit = chi_square_ok(counts, probs)
    assert stat < crit, (stat, crit, counts, probs * n)


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p=0.8),
        dict(top_p=0.6, min_p=0.2),
        dict(top_p=0.95, min_p=0.3, temperature=0.8),
        dict(top_p=0.24, temperature=20.0),  # candidates first (small top_p), then rejection
    ],
)
def test_nucleus_wider_than_the_candidates_by_rejection_and_by_sort(monkeypatch, kw):
    """With 2 candidates every nucleus here is 'wide' (a top_k row's nucleus never is: it lies
    within its top_k candidates): the rejection path, and with one draw allowed its sort
    fallback, must still sample the exact nucleus distribution."""
    monkeypatch.setattr(sampling, "_CANDIDATES", 2)
    calls = []
    real = sampling._nucleus_by_rejection
    monkeypatch.setattr(sampling, "_nucleus_by_rejection", lambda *a: calls.append(1) or real(*a))
    probs = ref_kept_probs(SMALL[0].numpy(), **kw)
    assert (probs > 0).sum() > 2
    for max_draws in (32, 1):
        monkeypatch.setattr(sampling, "_MAX_DRAWS", max_draws)
        counts = np.bincount(draw_many(SMALL, 20000, False, **kw), minlength=SMALL.shape[1])
        assert (counts[probs == 0] == 0).all() and (counts[probs > 0] > 0).all()
        stat, crit = chi_square_ok(counts, probs)
        assert stat < crit, (max_draws, stat, crit, counts, probs * 20000)
    assert calls


def test_ties_straddling_the_candidates_keep_every_tied_token(monkeypatch):
    monkeypatch.setattr(sampling, "_CANDIDATES", 2)
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0, 2.0, 2.0, -1.0]])  # top_k=2 cuts inside the 2.0 tie
    for exact_sort in STRATEGIES:
        toks = draw_many(x, 3000, exact_sort, top_k=2)
        assert set(toks.tolist()) == {1, 3, 4, 5}


@pytest.mark.parametrize("exact_sort", STRATEGIES)
def test_filters_on_a_large_vocab_never_leave_their_set(exact_sort):
    vocab = 5000
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, vocab, generator=g) * 2
    p = torch.softmax(x[0].double(), -1).numpy()
    for kw in (dict(top_k=3), dict(top_p=0.05), dict(min_p=0.5), dict(top_p=0.6)):
        allowed = np.flatnonzero(ref_kept_probs(x[0].numpy(), **kw))
        toks = draw_many(x, 1000, exact_sort, **kw)
        assert np.isin(toks, allowed).all(), kw
        if len(allowed) <= 10:
            assert set(toks.tolist()) == set(allowed.tolist()), kw
    assert p.max() < 0.5  # the large-vocab rows above really were filtered


def test_search_never_lands_on_zero_weight_tokens():
    cs = torch.tensor([[0.25, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])
    for target in ([0.5 - 2.0**-25, 0.0], [0.5, 1.0], [7.0, -1.0]):
        np.testing.assert_array_equal(K.search(cs, torch.tensor(target)).numpy(), [1, 2])


@pytest.mark.parametrize("width", [40, 3 * 1024 + 5, 6 * 1024, 6000])
def test_draw_handles_block_edges_and_zero_weights(width):
    w = torch.zeros(3, width)
    w[0, [0, width - 1]] = 1.0  # first and last columns only
    w[1, 1024 % width] = 2.0  # a single token, on a block edge when the row is blocked
    w[2, width // 2 :] = 1.0  # a zero-weight head
    for u in (0.0, 0.49999, 0.5, 1.0 - 2.0**-24, 1.0):
        pos = K.draw(w, torch.full((3,), u)).numpy()
        assert (w[torch.arange(3), torch.from_numpy(pos)] > 0).all(), (u, pos)
    assert K.draw(w, torch.zeros(3))[0] == 0
    assert K.draw(w, torch.full((3,), 0.999))[0] == width - 1


@pytest.mark.parametrize("width", [100, 8 * 1024, 8 * 1024 + 37, 262144])
def test_blocked_argmax_and_topk_equal_torch(width):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, width, generator=g).bfloat16().float()  # bf16 values: many ties
    x[1] = 0.0  # all tied: the first index wins
    x[2, -1] = 100.0  # maximum in the partial tail block
    x[3, [7, width - 3]] = 50.0  # tied maxima in different blocks
    x[4, width // 2 :] = float("-inf")
    np.testing.assert_array_equal(K.argmax(x).numpy(), x.argmax(-1).numpy())
    for k in (k for k in (1, 5, 20, 257) if k <= width):
        vals, ids = K.topk(x, k)
        ref = x.topk(k, dim=-1).values
        torch.testing.assert_close(vals, ref)
        torch.testing.assert_close(x.gather(1, ids), vals)  # ids point at those values
        assert all(len(set(r.tolist())) == k for r in ids)  # distinct tokens


def test_blocked_draw_matches_the_distribution():
    """A vocabulary wider than the two-level draw's blocks, with mass on block edges and the tail."""
    vocab = 6000  # 5 full blocks and a partial one
    special = [0, 1023, 1024, 4095, 5999]
    x = torch.zeros(1, vocab)
    x[0, special] = torch.log(torch.tensor([3000.0, 1000.0, 2000.0, 500.0, 1500.0]))
    p = torch.softmax(x[0].double(), -1).numpy()
    probs = np.append(p[special], 1 - p[special].sum())
    for exact_sort in STRATEGIES:
        toks = draw_many(x, 6000, exact_sort)
        counts = np.array([(toks == s).sum() for s in special] + [(~np.isin(toks, special)).sum()])
        stat, crit = chi_square_ok(counts, probs)
        assert stat < crit, (stat, crit, counts, probs * 6000)


# ------------------------------------------------------------------ penalties and bias


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_and_bias_match_the_reference(device):
    vocab = 200
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(5, vocab, generator=g) * 3).to(device)
    rows = [
        row(prompt=[1, 2, 2, 5], output=[5, 7, 7, 7, 150], repetition_penalty=1.5),
        row(prompt=[1, 2], output=[2, 9, 9], frequency_penalty=0.7, presence_penalty=-0.3),
        row(prompt=[4, 4, 4], output=[4, 8], repetition_penalty=0.8, frequency_penalty=-1.0, presence_penalty=2.0),
        row(logit_bias={0: 100.0, 1: -100.0, 199: 0.5}),
        row(prompt=[3], output=[], repetition_penalty=1.2, logit_bias={3: 2.0}),
    ]
    got = penalized_logits(x, rows).cpu().numpy()
    for i, r in enumerate(rows):
        np.testing.assert_allclose(got[i], ref_penalized(x[i].cpu().numpy(), r), rtol=1e-6, atol=1e-6)
    # greedy rows take the argmax of exactly these logits; the input is left untouched
    before = x.clone()
    greedy = [row(temperature=0.0, prompt=r.prompt_token_ids, output=r.output_token_ids,
                  repetition_penalty=r.params.repetition_penalty,
                  frequency_penalty=r.params.frequency_penalty,
                  presence_penalty=r.params.presence_penalty,
                  logit_bias=r.params.logit_bias) for r in rows]
    np.testing.assert_array_equal(sample(x, greedy).token_ids, got.argmax(-1))
    assert torch.equal(x, before)
    assert sample(x, greedy).token_ids[3] == 0


def test_penalties_change_the_sampled_distribution():
    x = torch.zeros(1, 4)
    kw = dict(prompt=[0], output=[1, 1, 1], frequency_penalty=2.0, presence_penalty=2.0)
    toks = draw_many(x, 4000, False, **kw)
    probs = ref_kept_probs(ref_penalized(x[0].numpy(), row(**kw)))
    stat, crit = chi_square_ok(np.bincount(toks, minlength=4), probs)
    assert stat < crit


def test_logit_bias_outside_the_vocab_is_a_typed_error():
    with pytest.raises(InvalidRequestError):
        sample(torch.zeros(1, 10), [row(logit_bias={10: 1.0})])


# ------------------------------------------------------------------ logprobs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [3000, 262144])
def test_logprobs_are_log_softmax_of_the_raw_logits(dtype, vocab, device):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(4, vocab, generator=g) * 2).to(dtype).to(device)
    rows = [
        row(seed=1, logprobs=True, top_logprobs=5, temperature=0.5, frequency_penalty=1.0, output=[1, 2]),
        row(seed=2),  # asks nothing
        row(seed=3, logprobs=True, top_logprobs=2, top_p=0.9, logit_bias={7: 30.0}),
        row(seed=4, logprobs=True, temperature=0.0),
    ]
    out = sample(x, rows)
    ref = torch.log_softmax(x.float(), dim=-1).cpu().numpy()
    asked = [0, 2, 3]
    # bit-identical: the same fused kernel, run in place in the sampler's buffer
    np.testing.assert_array_equal(out.logprobs[asked], ref[asked, out.token_ids[asked]])
    assert np.isnan(out.logprobs[1])
    assert out.token_ids[2] == 7  # the bias steers the draw, not the logprob
    assert out.top_ids.shape == out.top_logprobs.shape == (4, 5)
    for i in asked:
        np.testing.assert_array_equal(out.top_logprobs[i], ref[i, out.top_ids[i]])
        assert (np.diff(out.top_logprobs[i]) <= 0).all()  # best first
        np.testing.assert_array_equal(out.top_logprobs[i], np.sort(ref[i])[::-1][:5])
    assert (out.top_ids[1] == -1).all() and np.isnan(out.top_logprobs[1]).all()


def test_logprobs_without_top_logprobs():
    out = sample(torch.randn(2, 50), [row(logprobs=True, temperature=0.0), row()])
    assert out.top_ids is None and out.top_logprobs is None
    assert out.logprobs.dtype == np.float32 and np.isfinite(out.logprobs[0])


@pytest.mark.parametrize("device", DEVICES[1:])  # empty (skipped) without an accelerator
def test_accelerator_draws_what_the_cpu_sorted_path_draws(device):
    """Same thresholds and the same uniform: only float rounding at a boundary may differ."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(256, 262144, generator=g) * 3
    kinds = [dict(), dict(top_p=0.9), dict(top_k=50), dict(min_p=0.05), dict(top_p=0.5, temperature=0.7)]
    rows = [row(seed=i, step=i, **kinds[i % len(kinds)]) for i in range(256)]
    on_cpu = sample(x, rows, exact_sort=True).token_ids
    on_dev = sample(x.to(device), rows).token_ids
    assert (on_cpu == on_dev).mean() > 0.97
