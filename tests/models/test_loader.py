"""load_weights dispatch: random:NAME, .gguf files, HF folders, and clear errors otherwise."""

from __future__ import annotations

import subprocess
import sys

import pytest

from localserve.errors import ModelLoadError
from localserve.models.loader import load_weights
from localserve.models.presets import load_preset
from tests.models.gguf_writing import write_gguf


def test_dispatch_random_and_gguf_by_suffix_or_magic(tmp_path):
    assert load_weights("random:tiny-qwen3").meta["format"] == "random"
    p = write_gguf(tmp_path / "m.gguf", load_preset("tiny-qwen3"))
    assert load_weights(str(p)).meta["format"] == "gguf"
    no_suffix = tmp_path / "model.bin"
    no_suffix.write_bytes(p.read_bytes())
    assert load_weights(no_suffix).config.architecture == "qwen3"


def test_unrecognized_file(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError) as e:
        load_weights(str(p))
    assert str(p) in str(e.value) and "not a GGUF" in e.value.reason


def test_models_package_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import localserve.models.loader, localserve.models.gguf_loader, localserve.models.hf_loader\n"
        "import localserve.models.presets, localserve.models.ggml_quants\n"
        "w = localserve.models.loader.load_weights('random:tiny-gemma3'); w.dense('token_embd.weight')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
