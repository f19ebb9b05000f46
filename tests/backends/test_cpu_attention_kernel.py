"""The compiled CPU paged attention kernel (backends/cpu/kernels/paged_attention.cpp):
against a float64 reference on random paged caches (shuffled pages, ragged lengths, decode
rows and prefill chunks, sliding windows, GQA, float32 / bfloat16 / float16 caches), bitwise
batch invariance (a row alone == the same row in any batch, any thread count, any split),
its wiring in TorchPagedAttention, the fallback, and end to end on the default model: a
sampled request gives the same tokens alone and batched."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from localserve.backends.cpu import kernels
from localserve.backends.torch_common.attention import TorchPagedAttention
from localserve.engine.plan import Plan


@pytest.fixture
def kernel(localserve_home):
    """Built under the session's LOCALSERVE_HOME (not at collection, into the user's cache)."""
    if not kernels.attention_available():
        pytest.skip("attention kernel did not build here")


pytestmark = pytest.mark.usefixtures("kernel")


class Paged:
    """A random paged cache holding sequences given as (seq_len, query rows) pairs, each
    sequence's pages drawn at random from a shuffled pool (stale random data elsewhere)."""

    def __init__(self, seqs: list[tuple[int, int]], hkv: int, d: int, block_size: int,
                 dtype: torch.dtype, seed: int, spare_blocks: int = 7) -> None:
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        need = [-(-n // block_size) for n, _ in seqs]
        num_blocks = sum(need) + spare_blocks
        pages = rng.permutation(num_blocks)
        width = max(need) + 2  # padded past every sequence's pages, as Plan's tables are
        self.tables = np.zeros((len(seqs), width), dtype=np.int32)
        used = 0
        for b, nb in enumerate(need):
            self.tables[b, :nb] = pages[used:used + nb]
            used += nb
        self.seq_lens = np.array([n for n, _ in seqs], dtype=np.int32)
        self.qsl = np.concatenate([[0], np.cumsum([q for _, q in seqs])]).astype(np.int32)
        self.block_size = block_size
        self.k = torch.randn(num_blocks * block_size, hkv, d, generator=gen).to(dtype)
        self.v = torch.randn(num_blocks * block_size, hkv, d, generator=gen).to(dtype)

    def batch(self) -> kernels.PagedBatch:
        return kernels.PagedBatch.build(self.qsl, self.seq_lens, self.tables, self.block_size)

    def slots(self, b: int) -> np.ndarray:
        pos = np.arange(self.seq_lens[b])
        return self.tables[b, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size


def reference(q: torch.Tensor, cache: Paged, scale: float, window: int | None) -> torch.Tensor:
    """float64 softmax attention, one query and head at a time, keys gathered by position."""
    t, h, d = q.shape
    hkv = cache.k.shape[1]
    out = torch.zeros(t, h, d, dtype=torch.float64)
    for b in range(len(cache.seq_lens)):
        q0, q1, n = int(cache.qsl[b]), int(cache.qsl[b + 1]), int(cache.seq_lens[b])
        slots = torch.from_numpy(cache.slots(b))
        k, v = cache.k[slots].double(), cache.v[slots].double()
        for i in range(q1 - q0):
            p = n - (q1 - q0) + i
            lo = max(0, p - window + 1) if window else 0
            for head in range(h):
                kv = head // (h // hkv)
                w = torch.softmax((k[lo:p + 1, kv] @ q[q0 + i, head].double()) * scale, 0)
                out[q0 + i, head] = w @ v[lo:p + 1, kv]
    return out.reshape(t, h * d)


# heads, kv heads, head_dim, block size, window, (seq_len, query rows) per sequence
CASES = [
    (4, 1, 256, 16, None, [(1, 1), (700, 1), (37, 37), (530, 20), (300, 1)]),  # gemma's shape
    (4, 1, 256, 16, 512, [(1000, 1), (600, 25), (12, 1), (513, 1)]),  # gemma's sliding layers
    (6, 2, 64, 8, 5, [(40, 3), (9, 9), (17, 1), (260, 1)]),  # window inside a page, GQA 3
    (2, 2, 48, 4, None, [(300, 1), (5, 2), (66, 66)]),  # MHA, head_dim 48
    (8, 1, 40, 32, 100, [(257, 1), (90, 30)]),  # head_dim not a multiple of 16: portable loops
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_float64_reference(case, dtype):
    h, hkv, d, bs, window, seqs = CASES[case]
    cache = Paged(seqs, hkv, d, bs, dtype, seed=case)
    q = torch.randn(int(cache.qsl[-1]), h, d, generator=torch.Generator().manual_seed(100 + case))
    scale = d ** -0.5
    ref = reference(q, cache, scale, window)
    for simd in (True, False):
        out = kernels.paged_attention(q, cache.k, cache.v, cache.batch(), scale, window, simd=simd)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        err = float((out.double() - ref).abs().max())
        assert err < 2e-6, (simd, err)


def _rows_of(out: torch.Tensor, cache: Paged, b: int) -> torch.Tensor:
    return out[int(cache.qsl[b]):int(cache.qsl[b + 1])]


@pytest.mark.parametrize("window", [None, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_bitwise_batch_invariant(window, dtype):
    """A decode row and a prefill chunk computed alone give the same bits as inside batches of
    other rows with other lengths, at any position in the batch, with 1 or 2 threads, with the
    key chunks split over threads or not, on the AVX-512 and the portable path; a query row
    also gives the same bits as the last row of a prefill chunk as it does as a decode row."""
    h, hkv, d, bs = 4, 1, 256, 16
    target_decode, target_prefill = (777, 1), (600, 40)
    others = [(3, 1), (1200, 1), (64, 64), (300, 17), (513, 1), (20, 1), (900, 1)]
    gen = torch.Generator().manual_seed(7)
    # one shared set of K/V contents per (seq_len, rows): every batch lays them out on other pages
    keys = {s: (torch.randn(s[0], hkv, d, generator=gen), torch.randn(s[0], hkv, d, generator=gen),
                torch.randn(s[1], h, d, generator=gen)) for s in [target_decode, target_prefill, *others]}

    def run(seqs, seed, threads, split, simd=True):
        cache = Paged(seqs, hkv, d, bs, dtype, seed=seed)
        for b, s in enumerate(seqs):
            slots = torch.from_numpy(cache.slots(b))
            cache.k[slots] = keys[s][0].to(dtype)
            cache.v[slots] = keys[s][1].to(dtype)
        q = torch.cat([keys[s][2] for s in seqs])
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = kernels.paged_attention(q, cache.k, cache.v, cache.batch(), d ** -0.5, window,
                                          split=split, simd=simd)
        finally:
            torch.set_num_threads(old)
        return out, cache

    for target in (target_decode, target_prefill):
        alone, c = run([target], 0, 1, None)
        alone = _rows_of(alone, c, 0)
        batches = [
            [target, *others],
            [*others[:3], target, *others[3:]],
            [*others[::-1], target],
            [others[2], target],
        ]
        for i, seqs in enumerate(batches):
            for threads, split in ((1, None), (2, None), (2, True), (2, False)):
                out, c = run(seqs, seed=10 + i, threads=threads, split=split)
                got = _rows_of(out, c, seqs.index(target))
                assert torch.equal(got, alone), (target, i, threads, split)
        split_alone, c = run([target], 1, 2, True)
        assert torch.equal(_rows_of(split_alone, c, 0), alone)
        # the portable loops (CPUs without AVX-512) hold the same property with their own bits
        portable, c = run([target], 0, 1, None, simd=False)
        out, c2 = run(batches[1], 11, 2, None, simd=False)
        assert torch.equal(_rows_of(out, c2, batches[1].index(target)), _rows_of(portable, c, 0))

    # the last row of the prefill chunk, asked again as a decode row of the same sequence
    n, rows = target_prefill
    k, v, q = keys[target_prefill]
    chunk, c = run([target_prefill], 3, 2, None)
    cache = Paged([(n, 1)], hkv, d, bs, dtype, seed=4)
    slots = torch.from_numpy(cache.slots(0))
    cache.k[slots], cache.v[slots] = k.to(dtype), v.to(dtype)
    dec = kernels.paged_attention(q[-1:], cache.k, cache.v, cache.batch(), d ** -0.5, window)
    assert torch.equal(dec[0], chunk[rows - 1])


def test_long_row_split_over_threads_gives_the_same_bits():
    """One decode row long enough that its key chunks are spread over both threads (the
    step's only work): the same bits as one thread looping over them, and the reference."""
    h, hkv, d, bs = 4, 1, 256, 16
    cache = Paged([(9000, 1)], hkv, d, bs, torch.float32, seed=9)
    q = torch.randn(1, h, d, generator=torch.Generator().manual_seed(9))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = [kernels.paged_attention(q, cache.k, cache.v, cache.batch(), d ** -0.5, None,
                                        split=split) for split in (None, True, False)]
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # float32 over 9,000 keys: the error grows with the row's length (2.0e-6 on an AVX2 CPU,
    # 3.3e-6 where the kernel takes another SIMD path), so the bound is the long-row one below.
    assert float((outs[0].double() - reference(q, cache, d ** -0.5, None)).abs().max()) < 1e-5


def make_plan(cache: Paged) -> Plan:
    pos = np.concatenate([np.arange(n - (cache.qsl[b + 1] - cache.qsl[b]), n)
                          for b, n in enumerate(cache.seq_lens)])
    b_of = np.repeat(np.arange(len(cache.seq_lens)), np.diff(cache.qsl))
    slots = cache.tables[b_of, pos // cache.block_size].astype(np.int64) * cache.block_size + pos % cache.block_size
    t = int(cache.qsl[-1])
    return Plan(seq_ids=list(range(len(cache.seq_lens))), input_ids=np.zeros(t, dtype=np.int64),
                positions=pos.astype(np.int64), slot_mapping=slots, query_start_loc=cache.qsl,
                seq_lens=cache.seq_lens, block_tables=cache.tables,
                sample_idx=np.zeros(0, dtype=np.int32), sampling=[], block_size=cache.block_size)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_torch_paged_attention_runs_kernel_and_matches_sdpa(kv_dtype):
    """TorchPagedAttention on CPU picks the kernel (no SDPA gathers built), writes the new K/V
    into the pages, and agrees with its SDPA path; float64 inputs fall back to SDPA."""
    h, hkv, d, bs, window = 4, 1, 256, 16, 512
    seqs = [(600, 1), (30, 30), (1100, 9), (2, 1)]
    cache = Paged(seqs, hkv, d, bs, kv_dtype, seed=5)
    plan = make_plan(cache)
    gen = torch.Generator().manual_seed(5)
    t = plan.num_tokens
    q, k, v = (torch.randn(t, n, d, generator=gen) for n in (h, hkv, hkv))
    auto = TorchPagedAttention(h, hkv, d, d ** -0.5, window)
    sdpa = TorchPagedAttention(h, hkv, d, d ** -0.5, window, kernel=False)
    meta = auto.prepare(plan)
    assert meta.paged is not None and meta.decode is None and not meta.prefills
    assert sdpa.prepare(plan).paged is None
    for sliding in (False, True):
        kc, vc = cache.k.clone(), cache.v.clone()
        out = auto.forward(q, k, v, kc, vc, meta, sliding)
        slots = torch.from_numpy(plan.slot_mapping)
        assert torch.equal(kc[slots], k.to(kv_dtype)) and torch.equal(vc[slots], v.to(kv_dtype))
        kc2, vc2 = cache.k.clone(), cache.v.clone()
        ref = sdpa.forward(q, k, v, kc2, vc2, sdpa.prepare(plan), sliding)
        assert float((out - ref).abs().max()) < 1e-5, sliding
        # a float64 run of the kernel's metadata goes through SDPA on the fly
        out64 = auto.forward(q.double(), k.double(), v.double(), cache.k.double(), cache.v.double(),
                             auto.prepare(plan), sliding)
        assert out64.dtype == torch.float64
        # (its new K/V are not rounded to the cache dtype)
        tol = 1e-5 if kv_dtype == torch.float32 else 3e-2
        assert float((out64 - ref.double()).abs().max()) < tol


def test_falls_back_to_sdpa_when_kernel_unavailable(monkeypatch, caplog):
    monkeypatch.setenv("LOCALSERVE_ATTENTION_KERNEL", "0")
    monkeypatch.setattr(kernels, "_state", {})
    with caplog.at_level(logging.WARNING):
        attn = TorchPagedAttention(2, 1, 16, 0.25, None)
        cache = Paged([(5, 5), (9, 1)], 1, 16, 4, torch.float32, seed=1)
        plan = make_plan(cache)
        meta = attn.prepare(plan)
        attn.prepare(plan)
    assert meta.paged is None and meta.decode is not None and len(meta.prefills) == 1
    assert sum("LOCALSERVE_ATTENTION_KERNEL" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError):
        TorchPagedAttention(2, 1, 16, 0.25, None, kernel=True).prepare(plan)
    monkeypatch.setattr(kernels, "_state", {})


def test_rejects_tables_past_the_cache():
    cache = Paged([(20, 1)], 1, 16, 4, torch.float32, seed=2)
    small = cache.k[: 4 * 4]
    q = torch.randn(1, 2, 16)
    tables = cache.tables.copy()
    tables[0, :5] = [0, 1, 2, 3, 4]  # block 4 lies past a 4-block cache
    batch = kernels.PagedBatch.build(cache.qsl, cache.seq_lens, tables, 4)
    with pytest.raises(ValueError, match="slot"):
        kernels.paged_attention(q, small, small, batch, 0.25)
    with pytest.raises(ValueError, match="shorter"):
        kernels.PagedBatch.build(cache.qsl, cache.seq_lens, tables[:, :4], 4)


# -- end to end on the embedded default model -------------------------------------------------

OTHER_PROMPTS = [
    "Hi.",
    "List three colours.",
    "Explain in two sentences why the sky is blue, and then say what colour sunsets are.",
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle "
    "washed up on the shore one stormy night, and what happens when she tries to answer it.",
]


@pytest.mark.slow
def test_sampled_request_same_tokens_alone_and_batched(default_gguf):
    """temperature 0.9, seed 42: the haiku request alone and batched with 4 prompts of other
    lengths (prefilled in the same step, then decoded together) gives the same 24 tokens.
    (With the SDPA path it did not: the padded decode batch changed last bits, which the
    int16 activation quantization of the next layers amplified until a sample flipped.)"""
    from localserve.engine.backend import BackendConfig
    from localserve.engine.llm_engine import EngineConfig
    from localserve.engine.sampling_params import SamplingParams
    from localserve.runtime.loader import load_model

    model = load_model(None, backend="cpu", backend_cfg=BackendConfig(num_threads=2),
                       engine_cfg=EngineConfig(num_blocks=1024, max_num_batched_tokens=1024))
    assert model.engine.backend.model.attention.uses_kernel()  # the kernel runs, not SDPA
    eng, tok = model.engine, model.tokenizer

    def chat(text: str) -> list[int]:
        return tok.encode_chat([{"role": "user", "content": text}])

    target = chat("Write a haiku about rain.")
    params = SamplingParams(max_tokens=24, temperature=0.9, seed=42, ignore_eos=True)
    alone = eng.generate([target], params)[0][0].output_token_ids
    assert len(alone) == 24
    others = [chat(p) for p in OTHER_PROMPTS]
    assert len({len(p) for p in others + [target]}) == 5
    other_params = SamplingParams(max_tokens=30, temperature=0.7, seed=1, ignore_eos=True)
    order = [*others[:2], target, *others[2:]]
    eng.reset_prefix_cache()  # a cold prefill, as alone
    reqs = eng.generate(order, [params if p is target else other_params for p in order])
    assert reqs[2][0].output_token_ids == alone
