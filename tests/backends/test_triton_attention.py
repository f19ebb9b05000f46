"""The Triton paged attention kernel against the torch reference (TorchPagedAttention), on the CPU
through Triton's interpreter: prefill chunks over cached prefixes, decode rows, mixed batches,
GQA groups, sliding windows, bf16 caches, head dims that are not powers of two."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from localserve.backends.torch_common.attention import TorchPagedAttention  # noqa: E402
from localserve.engine.plan import Plan  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from localserve.backends.triton_kernels.attention import TritonPagedAttention  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def make_plan(rng, shapes: list[tuple[int, int]], block_size: int, num_blocks: int) -> Plan:
    """shapes: (cached tokens, new tokens) per sequence; pages drawn at random, no sharing."""
    pages = rng.permutation(num_blocks)
    tables, pos, slots, qsl, seq_lens = [], [], [], [0], []
    max_blocks = max(-(-(c + n) // block_size) for c, n in shapes)
    used = 0
    for cached, new in shapes:
        total = cached + new
        nb = -(-total // block_size)
        table = np.zeros(max_blocks, dtype=np.int32)
        table[:nb] = pages[used:used + nb]
        used += nb
        p = np.arange(cached, total)
        pos.append(p)
        slots.append(table[p // block_size].astype(np.int64) * block_size + p % block_size)
        tables.append(table)
        qsl.append(qsl[-1] + new)
        seq_lens.append(total)
    t = qsl[-1]
    return Plan(
        seq_ids=list(range(len(shapes))), input_ids=np.zeros(t, dtype=np.int64),
        positions=np.concatenate(pos), slot_mapping=np.concatenate(slots),
        query_start_loc=np.array(qsl, dtype=np.int32), seq_lens=np.array(seq_lens, dtype=np.int32),
        block_tables=np.stack(tables), sample_idx=np.zeros(0, dtype=np.int32), sampling=[],
        block_size=block_size,
    )


CASES = [
    # heads, kv heads, head_dim, window, block_size, (cached, new) per sequence
    (4, 2, 16, None, 4, [(0, 7), (5, 1), (9, 1), (3, 12)]),  # mixed prefill + decode
    (8, 1, 32, 6, 4, [(20, 1), (0, 19), (13, 9)]),  # sliding window, GQA group 8
    (4, 4, 24, None, 8, [(0, 1), (31, 1), (7, 1)]),  # decode only, MHA, head_dim 24
    (2, 1, 64, 5, 16, [(40, 3), (0, 33)]),  # window inside one page
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_torch_reference(case, dtype):
    h, hkv, d, window, bs, shapes = case
    rng = np.random.default_rng(hash((h, d, len(shapes))) % 2**32)
    num_blocks = 64
    plan = make_plan(rng, shapes, bs, num_blocks)
    t = plan.num_tokens
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(t, h, d, generator=gen)
    k = torch.randn(t, hkv, d, generator=gen)
    v = torch.randn(t, hkv, d, generator=gen)
    cache = torch.randn(2, num_blocks * bs, hkv, d, generator=gen)  # stale data everywhere else
    scale = d ** -0.5

    ref_attn = TorchPagedAttention(h, hkv, d, scale, window)
    kc, vc = cache[0].clone(), cache[1].clone()
    meta = ref_attn.prepare(plan)
    for sliding in ([False, True] if window else [False]):
        ref = ref_attn.forward(q.double(), k.double(), v.double(), kc.double(), vc.double(),
                               meta, sliding).float()
        tri = TritonPagedAttention(h, hkv, d, scale, window, torch.device(DEVICE))
        tk = cache[0].to(DEVICE, dtype).clone()
        tv = cache[1].to(DEVICE, dtype).clone()
        out = tri.forward(q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), tk, tv,
                          tri.prepare(plan), sliding).float().cpu()
        # the new K/V were written into the pages
        slots = torch.from_numpy(plan.slot_mapping)
        assert torch.equal(tk.cpu()[slots], k.to(dtype))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        err = (out - ref).norm() / ref.norm()
        assert err < tol, (sliding, float(err))


def test_graph_metadata_roundtrip():
    """The fixed-shape decode metadata, refilled from host arrays, gives the eager result."""
    h, hkv, d, bs = 4, 2, 16, 4
    rng = np.random.default_rng(3)
    plan = make_plan(rng, [(6, 1), (0, 1), (13, 1)], bs, 32)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, h, d, generator=gen)
    k = torch.randn(3, hkv, d, generator=gen)
    v = torch.randn(3, hkv, d, generator=gen)
    cache = torch.randn(2, 32 * bs, hkv, d, generator=gen)
    attn = TritonPagedAttention(h, hkv, d, d ** -0.5, None, torch.device(DEVICE))
    eager = attn.forward(q, k, v, cache[0].clone(), cache[1].clone(), attn.prepare(plan), False)
    slots = torch.from_numpy(plan.slot_mapping)
    meta = attn.graph_metadata(3, 8, bs, slots)
    attn.fill_graph_metadata(meta, plan.seq_lens, plan.block_tables)
    graph = attn.forward(q, k, v, cache[0].clone(), cache[1].clone(), meta, False)
    assert torch.allclose(eager, graph)


# -- fused elementwise kernels (backends/triton_kernels/fused.py) ----------------------------

from localserve.backends.torch_common.layers import rms_norm as torch_rms_norm  # noqa: E402
from localserve.backends.torch_common.rope import RotaryTable, apply_rotary  # noqa: E402
from localserve.backends.triton_kernels import fused as FK  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 100])
def test_rms_norm_and_add(dtype, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=gen).to(dtype)
    r = torch.randn(5, n, generator=gen).to(dtype)
    w = (1 + 0.3 * torch.randn(n, generator=gen)).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(FK.rms_norm(x, w, 1e-6), torch_rms_norm(x, w, 1e-6)) < tol
    res = r.clone()
    out = FK.add_rms_norm(x, res, w, 1e-6)
    # the residual is updated in place, rounded to the dtype as torch adds (the interpreter
    # truncates where a GPU rounds to nearest: one bf16 ulp apart there)
    ulp = 0 if dtype == torch.float32 else 2.0 ** -7
    assert ((res.float() - (x + r).float()).abs() <= ulp * (x + r).float().abs()).all()
    assert _rel(out, torch_rms_norm(x + r, w, 1e-6)) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_qk_norm_kv_write(dtype, qk_norm):
    t, h, hkv, d = 6, 4, 2, 24
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=gen).to(dtype)
    q = qkv[:, :h * d].unflatten(1, (h, d))  # strided views, as the model passes them
    k = qkv[:, h * d:(h + hkv) * d].unflatten(1, (hkv, d))
    v = qkv[:, (h + hkv) * d:].unflatten(1, (hkv, d))
    qn = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype) if qk_norm else None
    kn = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype) if qk_norm else None
    table = RotaryTable(d, 10000.0, None)
    pos = torch.tensor([0, 3, 17, 5, 9, 40])
    cos, sin = table.lookup(pos, 63)
    cos_t, sin_t = table.cos[:64].to(dtype), table.sin[:64].to(dtype)
    slots = torch.tensor([7, 0, 12, 3, 30, 21])
    kc = torch.full((32, hkv, d), 99.0).to(dtype)
    vc = kc.clone()
    out = FK.rope_qk_norm_kv_write(q, k, v, pos, cos_t, sin_t, slots, kc, vc, qn, kn, 1e-6)

    rq, rk = q, k
    if qk_norm:
        rq, rk = torch_rms_norm(q, qn, 1e-6), torch_rms_norm(k, kn, 1e-6)
    cos, sin = cos.to(dtype), sin.to(dtype)
    ref_q, ref_k = apply_rotary(rq, cos, sin), apply_rotary(rk, cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(out, ref_q) < tol
    assert _rel(kc[slots], ref_k) < tol
    assert torch.equal(vc[slots], v)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert (kc[untouched] == 99).all() and (vc[untouched] == 99).all()


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_mul(act, dtype):
    gen = torch.Generator().manual_seed(2)
    gu = (2 * torch.randn(3, 2 * 1500, generator=gen)).to(dtype)  # two column blocks, one partial
    g, u = gu.chunk(2, dim=-1)
    f = torch.nn.functional
    ref = (f.silu(g) if act == "silu" else f.gelu(g, approximate="tanh")) * u
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(FK.act_mul(gu, act), ref) < tol
