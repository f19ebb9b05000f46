"""Fixtures of the store tests: tiny real GGUF files and a local hub on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.store.hub import LocalHub


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch, localserve_home):
    """Each store test gets an empty data dir of its own: what other tests (servers' pull jobs,
    the TUI) leave in the session's store must not show up here, nor the other way round. The
    embedded default, when a test needs it, is registered from the session's assembled file."""
    home = tmp_path / "home"
    monkeypatch.setenv("LOCALSERVE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A loadable 2-layer mistral GGUF (random weights, Q8_0 projections), ~0.3 MB."""
    from localserve.models.presets import load_preset
    from tests.models.gguf_writing import write_gguf

    w = load_preset("tiny-mistral")
    quant = {n: "Q8_0" for n in w.tensors if not n.endswith("norm.weight")}
    return write_gguf(tmp_path_factory.mktemp("tiny") / "tiny-mistral-Q8_0.gguf", w, quant=quant)


@pytest.fixture(scope="session")
def big_gguf(tmp_path_factory) -> Path:
    """tiny-mistral plus a 24 MB extra tensor: larger than huggingface_hub's 10 MiB download
    chunk, the granularity at which an interrupted download keeps its bytes."""
    import numpy as np

    from localserve.models.presets import load_preset
    from tests.models.gguf_writing import write_gguf

    pad = np.random.default_rng(0).standard_normal((6 << 20) // 64 * 64, dtype=np.float32).reshape(-1, 64)
    path = tmp_path_factory.mktemp("big") / "big-mistral-F32.gguf"
    return write_gguf(path, load_preset("tiny-mistral"), extra_tensors={"test.padding": pad})


@pytest.fixture(scope="session")
def tiny_f32_gguf(tmp_path_factory) -> Path:
    from localserve.models.presets import load_preset
    from tests.models.gguf_writing import write_gguf

    return write_gguf(tmp_path_factory.mktemp("tiny32") / "tiny-mistral-F32.gguf", load_preset("tiny-mistral"))


@pytest.fixture
def hub(monkeypatch):
    h = LocalHub()
    url = h.start()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    h.url = url
    yield h
    h.stop()


@pytest.fixture
def default_store(default_gguf):
    """The session's store with the embedded default registered (what the CLI opens)."""
    from localserve.store.default import register_default
    from localserve.store.store import ModelStore

    store = ModelStore()
    register_default(store, default_gguf)
    return store
