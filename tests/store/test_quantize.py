"""`localserve quantize`: GGUF -> GGUF in every type gguf-py writes, registered and loadable."""

from __future__ import annotations

import re

import numpy as np
import pytest

from localserve.cli import main
from localserve.models.loader import load_weights
from localserve.store.quantize import quantize_gguf, writable_types
from localserve.store.quantize_job import quantize_to_store
from localserve.store.store import ModelStore
from tests.store._util import store_state

# relative RMS error allowed per target on random normal weights
TOLERANCE = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q5_0": 6e-2, "Q5_1": 6e-2,
             "Q4_0": 0.12, "Q4_1": 0.12, "MXFP4": 0.25}


def test_writable_types_cover_the_issue():
    types = writable_types()
    assert {"Q8_0", "Q4_0", "F16", "BF16"} <= set(types)
    assert "Q4_K" not in types and "TQ1_0" not in types


@pytest.mark.parametrize("target", sorted(TOLERANCE))
def test_every_writable_type_loads_and_stays_close(target, tiny_f32_gguf, tmp_path):
    out = quantize_gguf(tiny_f32_gguf, tmp_path / "out.gguf", target)
    src, dst = load_weights(tiny_f32_gguf), load_weights(out.path)
    assert dst.config == src.config
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        a, b = src.dense(name), dst.dense(name)
        assert np.sqrt(np.mean((a - b) ** 2) / np.mean(a**2)) <= TOLERANCE[target] + 1e-7, name
    assert dst.tensors["blk.0.attn_norm.weight"].dtype == np.float32  # vectors stay F32
    head = dst.tensors["output.weight"]
    want = "Q8_0" if target in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4") else target
    assert getattr(head, "ggml_type", "F32") == want  # the output layer keeps 8 bits
    assert out.types.get(target, 0) > 0


def test_same_type_is_copied_byte_for_byte(tiny_gguf, tmp_path):
    src = load_weights(tiny_gguf)
    dst = load_weights(quantize_gguf(tiny_gguf, tmp_path / "same.gguf", "Q8_0").path)
    for name, t in src.tensors.items():
        if hasattr(t, "raw"):
            assert np.array_equal(t.raw, dst.tensors[name].raw), name


def test_quantize_registers_in_the_store(tiny_f32_gguf, tmp_path):
    store = ModelStore(tmp_path)
    outcome = quantize_to_store(store, str(tiny_f32_gguf), "q4_0")
    m = outcome.manifest
    assert (m.ref, m.quantization, m.architecture) == ("tiny-mistral:Q4_0", "Q4_0", "mistral")
    assert store.model_path(m) == outcome.result.path
    assert outcome.result.out_bytes < outcome.result.src_bytes / 3
    # from a store name: the tag says where it came from
    again = quantize_to_store(store, "tiny-mistral:Q4_0", "F16")
    assert again.manifest.ref == "tiny-mistral:Q4_0-F16"
    assert not list((tmp_path / "partial").iterdir())


@pytest.mark.parametrize("target, message", [("Q4_K", "supported: F32, F16"), ("TQ1_0", "ternary"), ("Q9_9", "cannot quantize")])
def test_unsupported_target_fails_clearly(target, message, tiny_gguf, default_store, capsys):
    before = store_state(default_store)
    assert main(["quantize", str(tiny_gguf), "--to", target, "--no-check", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("localserve quantize: ") and message in err
    assert store_state(default_store) == before
    assert not list(default_store.root.joinpath("partial").iterdir())


def test_quantize_a_non_gguf_fails_clearly(tmp_path, default_store, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    before = store_state(default_store)
    assert main(["quantize", str(bad), "--to", "Q8_0", "--no-check", "--quiet"]) == 1
    assert "localserve quantize: " in capsys.readouterr().err
    assert store_state(default_store) == before


@pytest.mark.slow
def test_quantize_default_to_q8_0_agrees_with_its_source(default_store, capsys):
    from localserve.runtime.default_model import resolve_model_ref

    rc = main(["quantize", "gemma3:270m", "--to", "Q8_0", "--check-tokens", "12", "--threads", "2", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "stored gemma3:270m-Q8_0" in out
    size_mb = float(re.search(r"stored gemma3:270m-Q8_0: ([\d.]+) MB", out).group(1))
    assert 280 < size_mb < 300  # Q8_0 of 268M weights (plus F32 norms)
    m = re.search(r"greedy agreement: (\d)/(\d) continuations identical, (\d+)%", out)
    assert m, out
    identical, prompts, prefix = map(int, m.groups())
    assert prompts == 4 and identical >= 3 and prefix >= 85
    assert load_weights(resolve_model_ref("gemma3:270m-Q8_0")).config.architecture == "gemma3"
    default_store.remove("gemma3:270m-Q8_0")


def test_a_cancel_from_the_progress_callback_leaves_nothing(tiny_f32_gguf, tmp_path):
    """The TUI / job API cancels by raising from the progress callback."""

    class Cancelled(Exception):
        pass

    def cancel_midway(values: int) -> None:
        seen.append(values)
        if len(seen) == 5:
            raise Cancelled

    store, seen = ModelStore(tmp_path), []
    before = store_state(store)
    with pytest.raises(Cancelled):
        quantize_to_store(store, str(tiny_f32_gguf), "Q8_0", on_values=cancel_midway)
    assert store_state(store) == before
    assert not list((tmp_path / "partial").iterdir())
