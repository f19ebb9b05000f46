"""The whole engine on the embedded default model (CPU backend, its default fast weights):
batched == alone, a prefix-cache hit == a cold run, same seed == same text, stop strings."""

from __future__ import annotations

import pytest

from localserve.engine.backend import BackendConfig
from localserve.engine.llm_engine import EngineConfig
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import ContextOverflowError

pytestmark = pytest.mark.slow
WEIGHT_FORMAT = "auto"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n\nx = np.",
]


@pytest.fixture(scope="module")
def model(default_gguf):
    from localserve.runtime.loader import load_model

    return load_model(
        None,
        backend="cpu",
        backend_cfg=BackendConfig(num_threads=2, weight_format=WEIGHT_FORMAT),
        engine_cfg=EngineConfig(num_blocks=2048, max_num_batched_tokens=512),
    )


def run(model, prompts, params):
    ids = [model.tokenizer.encode(p) for p in prompts]
    return model.engine.generate(ids, params)


def test_batched_equals_alone(model):
    p = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    batched = [seqs[0].output_token_ids for seqs in run(model, PROMPTS, p)]
    alone = [run(model, [q], p)[0][0].output_token_ids for q in PROMPTS]
    assert batched == alone
    text = model.tokenizer.decode(batched[0])
    assert "Paris" in text or len(set(batched[0])) > 3
    model.engine.check_integrity()


def test_prefix_hit_equals_cold(model):
    system = "You are a careful assistant. " * 40
    p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    model.engine.scheduler.kv.tree.reset()
    (cold,) = run(model, [system + "Question: what is 2+2?"], p)[0]
    (hit,) = run(model, [system + "Question: what is 2+2?"], p)[0]
    assert cold.num_cached_tokens == 0
    assert hit.num_cached_tokens >= len(model.tokenizer.encode(system)) - 32
    assert hit.output_token_ids == cold.output_token_ids


def test_same_seed_same_text_and_n_choices(model):
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=7, n=2)
    a = run(model, ["Write a short poem about the sea:"], p)[0]
    b = run(model, ["Write a short poem about the sea:"], p)[0]
    assert [s.output_token_ids for s in a] == [s.output_token_ids for s in b]
    assert a[0].output_token_ids != a[1].output_token_ids


def test_stop_string_cuts_text(model):
    tok = model.tokenizer
    p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    rid = model.engine.add_request(tok.encode("1, 2, 3, 4, 5,"), p)
    free_text = ""
    while model.engine.has_unfinished():
        free_text += "".join(d.text for d in model.engine.step() if d.request_id == rid)
    assert " 8," in free_text
    p2 = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[" 8,"])
    rid = model.engine.add_request(tok.encode("1, 2, 3, 4, 5,"), p2)
    text, last = "", None
    while model.engine.has_unfinished():
        for d in model.engine.step():
            if d.request_id == rid:
                text += d.text
                last = d
    assert text == free_text[: free_text.index(" 8,")]
    assert last.finish_reason == "stop" and last.stop_reason == " 8,"


def test_prompt_longer_than_context_is_an_error(model):
    with pytest.raises(ContextOverflowError):
        model.engine.add_request([2] + [100] * model.engine.max_context, SamplingParams(max_tokens=1))
