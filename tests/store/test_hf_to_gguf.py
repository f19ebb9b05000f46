"""HF safetensors folders -> GGUF (F32/F16/BF16/Q8_0) for the gemma3 and llama families,
and pulling an HF folder from the hub."""

from __future__ import annotations

import numpy as np
import pytest

from localserve.cli import main
from localserve.models.loader import load_weights
from localserve.models.tokenizer import Tokenizer
from localserve.store.quantize_job import quantize_to_store
from localserve.store.store import ModelStore
from tests.store._util import store_state
from tests.store.hf_folders import write_hf_folder
from tests.store.hub import HubFile

TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2}
TEXTS = ["Hello world!", "def add(a, b):\n    return a + b\n", "<|im_start|>user\nhi<|im_end|>", "naïve café 中文"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def hf_folder(request, tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}", request.param)


@pytest.mark.parametrize("target", sorted(TOLERANCE))
def test_hf_folder_converts_to_gguf(hf_folder, target, tmp_path):
    store = ModelStore(tmp_path)
    outcome = quantize_to_store(store, str(hf_folder), target)
    assert outcome.manifest.ref == f"{hf_folder.name}:{target}"
    src, dst = load_weights(hf_folder), load_weights(outcome.result.path)
    assert dst.config.architecture == src.config.architecture
    assert set(dst.tensors) == set(src.tensors)
    for name in src.tensors:  # q/k come back un-permuted: the same rows as the folder's
        a, b = src.dense(name), dst.dense(name)
        assert np.sqrt(np.mean((a - b) ** 2) / np.mean(a**2)) <= TOLERANCE[target] + 1e-7, name
    hf_tok, gguf_tok = Tokenizer.from_hf_folder(hf_folder), Tokenizer.from_gguf(outcome.result.path)
    assert [hf_tok.encode(t) for t in TEXTS] == [gguf_tok.encode(t) for t in TEXTS]
    assert gguf_tok.chat_template is not None


def test_cli_converts_and_checks_agreement(hf_folder, default_store, capsys):
    rc = main(["quantize", str(hf_folder), "--to", "F32", "--name", f"hf-{hf_folder.name}:f32", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "greedy agreement: 4/4 continuations identical, 100%" in out
    default_store.remove(f"hf-{hf_folder.name}:f32")


def test_hf_targets_are_limited(hf_folder, default_store, capsys):
    before = store_state(default_store)
    assert main(["quantize", str(hf_folder), "--to", "Q4_0", "--no-check", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cannot quantize an HF folder to 'Q4_0'" in err and "F32, F16, BF16, Q8_0" in err
    assert store_state(default_store) == before


def test_folder_without_tokenizer_is_refused(tmp_path, default_store, capsys):
    folder = write_hf_folder(tmp_path / "notok", "llama")
    (folder / "tokenizer.json").unlink()
    before = store_state(default_store)
    assert main(["quantize", str(folder), "--to", "F16", "--no-check", "--quiet"]) == 1
    assert "no tokenizer.json" in capsys.readouterr().err
    assert store_state(default_store) == before
    assert not list(default_store.root.joinpath("partial").iterdir())


def test_pull_an_hf_folder_from_the_hub(hub, tmp_path, default_store, capsys):
    from localserve.runtime.default_model import resolve_model_ref

    folder = write_hf_folder(tmp_path / "gemma", "gemma3")
    files = {p.name: HubFile(p.read_bytes(), lfs=p.suffix == ".safetensors") for p in folder.iterdir()}
    files["README.md"] = HubFile(b"# a model card\n", lfs=False)
    hub.add("test-org/tiny-gemma", files)
    assert main(["pull", "test-org/tiny-gemma", "--quiet"]) == 0, capsys.readouterr().err
    m = default_store.lookup("test-org/tiny-gemma")
    assert m.format == "hf" and m.architecture == "gemma3"
    assert sorted(f.path for f in m.files) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    path = resolve_model_ref("test-org/tiny-gemma:latest")
    assert load_weights(path).config == load_weights(folder).config
    # and on to GGUF, from the store name
    assert main(["quantize", "test-org/tiny-gemma", "--to", "Q8_0", "--no-check", "--quiet"]) == 0
    assert default_store.lookup("test-org/tiny-gemma:latest-Q8_0").quantization == "Q8_0"
    default_store.remove("test-org/tiny-gemma:latest-Q8_0")
    default_store.remove("test-org/tiny-gemma")
    assert not (default_store.root / "models" / "test-org").exists() or not any(
        (default_store.root / "models" / "test-org").rglob("*.safetensors")
    )


def test_bf16_folder_copies_bf16_and_converts_the_rest(tmp_path):
    """Released checkpoints are mostly bfloat16: BF16 is a byte copy, F16 / Q8_0 decode it."""
    import torch
    from safetensors.torch import load_file, save_file

    from localserve.store.hf_to_gguf import convert_hf_folder

    folder = write_hf_folder(tmp_path / "bf16-gemma", "gemma3")
    st = folder / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(st).items()}, st)
    src = load_weights(folder)
    for target, tol in (("BF16", 0.0), ("F16", 1e-6), ("Q8_0", 1e-2)):
        out = convert_hf_folder(folder, tmp_path / f"out-{target}.gguf", target)
        dst = load_weights(out.path)
        assert out.types == {target: 43, "F32": 37}  # 6 layers x 7 matrices + the embedding; vectors F32
        for name in src.tensors:
            a, b = src.dense(name), dst.dense(name)
            assert np.sqrt(np.mean((a - b) ** 2) / np.mean(a**2)) <= tol + 1e-7, (target, name)
    bf16 = load_weights(tmp_path / "out-BF16.gguf").tensors["blk.0.attn_q.weight"]
    assert np.array_equal(bf16.raw, src.tensors["blk.0.attn_q.weight"].raw)
