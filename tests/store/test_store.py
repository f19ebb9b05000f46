"""The store itself: names, manifests, blobs, the embedded default, resolving names."""

from __future__ import annotations

import os

import pytest

from localserve.errors import ModelLoadError
from localserve.store.manifest import Manifest, ManifestFile
from localserve.store.names import InvalidNameError, parse_name, quant_from_filename, split_stem
from localserve.store.store import ModelNotInStoreError, ModelStore, StoreError, sha256_file


@pytest.mark.parametrize(
    "text, name, tag",
    [("gemma3:270m", "gemma3", "270m"), ("org/model:Q4_K_M", "org/model", "Q4_K_M"), ("x", "x", "latest")],
)
def test_names(text, name, tag):
    sn = parse_name(text)
    assert (sn.name, sn.tag) == (name, tag)


@pytest.mark.parametrize("bad", ["../x:1", "a/../b:1", "a:b/c", ":tag", "a b:1", "a/b/c/d:1", "x:.hidden", "x.:1"])
def test_bad_names(bad):
    with pytest.raises(InvalidNameError):
        parse_name(bad)


def test_quant_labels_from_file_names():
    assert quant_from_filename("gemma-3-270m-it-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_from_filename("sub/qwen2.5-0.5b-instruct-q8_0.gguf") == "Q8_0"
    assert quant_from_filename("Llama-3.2-1B-Instruct-IQ4_XS.gguf") == "IQ4_XS"
    assert quant_from_filename("model.gguf") is None
    assert split_stem("gemma-3-270m-it-Q4_K_M.gguf") == ("gemma-3-270m-it", "Q4_K_M")


def _blob(store: ModelStore, data: bytes) -> str:
    tmp = store.partial_path("t")
    tmp.write_bytes(data)
    sha = sha256_file(tmp)
    store.add_blob(tmp, sha)
    return sha


def test_manifests_blobs_lookup_and_gc(tmp_path):
    store = ModelStore(tmp_path)
    a, b = _blob(store, b"a" * 10), _blob(store, b"b" * 20)
    for tag, sha in (("one", a), ("two", b)):
        store.write_manifest(Manifest("org/m", tag, "gguf", [ManifestFile("model.gguf", sha, 10)]))
    store.write_manifest(Manifest("solo", "latest", "gguf", [ManifestFile("model.gguf", a, 10)]))
    assert [m.ref for m in store.list()] == ["org/m:one", "org/m:two", "solo:latest"]
    assert store.lookup("solo").ref == "solo:latest"
    with pytest.raises(StoreError, match="several tags"):
        store.lookup("org/m")
    with pytest.raises(ModelNotInStoreError):
        store.lookup("org/m:three")
    assert store.model_path(store.lookup("org/m:two")) == store.blob_path(b)
    # a blob still named elsewhere survives; the last reference frees it
    assert store.remove("org/m:one")[1] == 0
    assert store.remove("org/m:two")[1] == 20
    assert store.has_blob(a) and not store.has_blob(b)
    assert not (tmp_path / "manifests" / "org").exists()
    # a stray file in manifests/ is not a model; an unnamed blob is garbage
    (tmp_path / "manifests" / "junk.json").write_text("{not json")
    _blob(store, b"orphan")
    assert [m.ref for m in store.list()] == ["solo:latest"]
    assert store.gc() == len(b"orphan")
    with pytest.raises(AssertionError):  # a manifest never names a missing blob
        store.write_manifest(Manifest("x", "y", "gguf", [ManifestFile("model.gguf", "0" * 64, 1)]))


def test_default_is_registered_without_a_copy(default_store, default_gguf):
    from localserve.runtime.default_model import resolve_model_ref

    m = default_store.lookup("gemma3:270m")
    assert (m.architecture, m.quantization, m.context) == ("gemma3", "Q4_K_M", 32768)
    assert m.parameters > 250_000_000
    f = m.files[0]
    if f.external is None:
        assert os.stat(default_store.blob_path(f.sha256)).st_ino == os.stat(default_gguf).st_ino
    else:
        assert f.external == str(default_gguf)
    assert resolve_model_ref("gemma3:270m") == str(default_store.model_path(m))
    assert resolve_model_ref("gemma3") == str(default_store.model_path(m))


def test_resolve_model_ref_keeps_paths_random_and_default(default_gguf, tmp_path, monkeypatch, localserve_home):
    from localserve.runtime.default_model import resolve_model_ref

    monkeypatch.setenv("LOCALSERVE_HOME", str(localserve_home))  # where the session assembled it

    assert resolve_model_ref(None) == str(default_gguf)
    assert resolve_model_ref("default") == str(default_gguf)
    assert resolve_model_ref("random:tiny-llama") == "random:tiny-llama"
    assert resolve_model_ref(str(default_gguf)) == str(default_gguf)
    assert resolve_model_ref("/no/such/file.gguf") == "/no/such/file.gguf"
    with pytest.raises(ModelLoadError, match="not in the store"):
        resolve_model_ref("nobody/nothing:Q4_0")


def test_default_cannot_be_removed(default_store, capsys):
    from localserve.cli import main

    assert main(["rm", "gemma3:270m"]) == 1
    assert "embedded default" in capsys.readouterr().err
    assert default_store.get(parse_name("gemma3:270m")) is not None


def test_the_cli_module_imports_nothing_heavy():
    """`localserve --help` imports localserve.store.cli: it must stay argparse-only."""
    import subprocess
    import sys

    code = (
        "import sys, localserve.store.cli\n"
        "bad = [m for m in ('numpy', 'gguf', 'huggingface_hub', 'torch', 'localserve.runtime') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_replacing_a_manifest_collects_its_old_blob(tmp_path):
    store = ModelStore(tmp_path)
    a, b = _blob(store, b"old"), _blob(store, b"new")
    with store.lock():
        store.write_manifest(Manifest("m", "t", "gguf", [ManifestFile("model.gguf", a, 3)]))
        store.write_manifest(Manifest("m", "t", "gguf", [ManifestFile("model.gguf", b, 3)]))
    assert store.has_blob(b) and not store.has_blob(a)


def test_hf_folder_follows_its_manifest(tmp_path):
    """An HF model is served as a folder of hard links; a new version under the same name must
    not keep the old files there (the loader globs *.safetensors) nor their bytes on disk."""
    store = ModelStore(tmp_path)
    cfg, w1, w2, w3 = (_blob(store, data) for data in (b"{}", b"weights-1", b"weights-2a", b"weights-2b"))

    def hf(*files):
        return Manifest("org/hf", "latest", "hf", [ManifestFile(p, sha, 1) for p, sha in files])

    with store.lock():
        store.write_manifest(hf(("config.json", cfg), ("model.safetensors", w1)))
    folder = store.model_path(store.lookup("org/hf"))
    assert os.path.samefile(folder / "model.safetensors", store.blob_path(w1))
    with store.lock():
        store.write_manifest(
            hf(("config.json", cfg), ("model-1.safetensors", w2), ("model-2.safetensors", w3))
        )
    assert not store.has_blob(w1) and not (folder / "model.safetensors").exists()
    folder = store.model_path(store.lookup("org/hf"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model-1.safetensors", "model-2.safetensors"]
    assert (folder / "model-2.safetensors").read_bytes() == b"weights-2b"
    # a stray file and a link that went stale are repaired on the next use
    (folder / "extra.safetensors").write_bytes(b"x")
    (folder / "config.json").unlink()
    folder = store.model_path(store.lookup("org/hf"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model-1.safetensors", "model-2.safetensors"]
