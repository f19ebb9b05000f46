"""Prepared weights: the CPU backend keeps a GGUF's Q8 codes after its first load and builds
the next load from them, with the same results, without dequantizing the file's layers again;
a changed file, a torn cache file and LOCALSERVE_PREPARED_CACHE=0 are handled."""

from __future__ import annotations

import os

import pytest

from localserve.backends.torch_common.layers import q8_kernel
from localserve.engine.backend import BackendConfig
from localserve.engine.llm_engine import EngineConfig, LLMEngine
from localserve.engine.sampling_params import SamplingParams
from localserve.models.presets import load_preset
from localserve.models.weights import LoadedWeights
from localserve.models.loader import load_weights
from tests.models.gguf_writing import write_gguf

pytestmark = pytest.mark.skipif(q8_kernel() is None, reason="the compiled Q8 kernel does not build here")

PROMPT = [5, 17, 99, 3, 42, 8, 61, 7, 250, 11]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def gguf_file(tmp_path):
    return write_gguf(tmp_path / "tiny-llama.gguf", load_preset("tiny-llama"))


def greedy(path) -> list[int]:
    from localserve.backends.cpu.backend import CPUBackend

    weights = load_weights(str(path))
    backend = CPUBackend()
    backend.load(weights, BackendConfig(weight_format="q8k", num_threads=1))
    engine = LLMEngine(backend, weights.config, None, EngineConfig(max_num_seqs=2, num_blocks=64))
    out = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    return list(out[0][0].output_token_ids)


def prepared_files(home) -> list:
    folder = home / "cache" / "prepared"
    return sorted(folder.glob("*.safetensors")) if folder.exists() else []


def count_layer_reads(monkeypatch) -> list[str]:
    """Names of the linear layers' tensors the load dequantizes from the file."""
    reads: list[str] = []
    original = LoadedWeights.dense

    def dense(self, name):
        if name.endswith(".weight") and ("attn_" in name or "ffn_" in name or name == "output.weight"):
            reads.append(name)
        return original(self, name)

    monkeypatch.setattr(LoadedWeights, "dense", dense)
    return reads


def test_the_second_load_is_built_from_the_codes_with_the_same_tokens(home, gguf_file, monkeypatch):
    monkeypatch.setenv("LOCALSERVE_PREPARED_CACHE", "0")
    reference = greedy(gguf_file)
    assert prepared_files(home) == []
    monkeypatch.delenv("LOCALSERVE_PREPARED_CACHE")
    reads = count_layer_reads(monkeypatch)
    assert greedy(gguf_file) == reference  # first load: quantized and kept
    assert reads and len(prepared_files(home)) == 1
    reads.clear()
    assert greedy(gguf_file) == reference  # second load: from the codes
    # what is left: norms, and an untied model's embedding table (kept dense, only rows are read)
    linears = [n for n in reads if not n.endswith("_norm.weight") and n != "token_embd.weight"]
    assert linears == [], linears


def test_a_changed_model_file_gets_new_codes(home, gguf_file):
    greedy(gguf_file)
    (first,) = prepared_files(home)
    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    greedy(gguf_file)
    files = prepared_files(home)
    assert len(files) == 2 and first in files


def test_a_torn_cache_file_is_rebuilt(home, gguf_file, caplog):
    reference = greedy(gguf_file)
    (path,) = prepared_files(home)
    path.write_bytes(path.read_bytes()[:1000])
    assert greedy(gguf_file) == reference
    assert "unreadable" in caplog.text
    assert path.stat().st_size > 1000  # written again, whole


def test_codes_of_another_shape_are_not_used(home, gguf_file):
    """A cache entry that does not fit the file's layer (a file replaced with the same size and
    time) is quantized again, never fed to the kernel."""
    import torch
    from safetensors.torch import load_file, save_file

    reference = greedy(gguf_file)
    (path,) = prepared_files(home)
    codes = load_file(str(path))
    name = next(k for k in codes if k.endswith(":q"))
    codes[name] = codes[name][:-1].clone()
    save_file(codes, str(path))
    assert greedy(gguf_file) == reference
