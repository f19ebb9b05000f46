"""The store commands as a user runs them: `python -m localserve ...` subprocesses over a fresh
LOCALSERVE_HOME, and `up NAME` + `ps` against a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from localserve.store.store import ModelStore
from tests.store._util import store_state


@pytest.fixture
def home(tmp_path, default_gguf) -> Path:
    """A fresh data dir that already holds the assembled default (hard links: no 253 MB copy,
    no re-assembly); the first command registers it in the store."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for p in default_gguf.parent.glob(default_gguf.stem + ".*"):  # the .gguf and its .verified marker
        try:
            os.link(p, home / "models" / p.name)
        except OSError:  # another filesystem
            shutil.copy2(p, home / "models" / p.name)
    return home


def cli(home: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCALSERVE_", "HF_"))}
    full_env |= {"LOCALSERVE_HOME": str(home), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "localserve", *argv], env=full_env, capture_output=True, text=True, timeout=300
    )


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


def _fails(res: subprocess.CompletedProcess, cmd: str, message: str) -> None:
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"localserve {cmd}: ") and message in last, res.stderr


def test_pull_ls_show_quantize_rm(home, tiny_f32_gguf):
    out = _ok(res := cli(home, "pull", str(tiny_f32_gguf)))
    assert "pulled tiny-mistral:F32 (" in out
    assert re.search(r"tiny-mistral-F32\.gguf .* 100\.0% .*/s", res.stderr)  # the progress line

    rows = _ok(cli(home, "ls")).splitlines()
    assert rows[0].split() == ["NAME", "SIZE", "QUANT", "ARCH", "CTX", "MODIFIED"]
    by_name = {r.split()[0]: r.split() for r in rows[1:]}
    assert by_name["gemma3:270m"][1:6] == ["253.1", "MB", "Q4_K_M", "gemma3", "32768"]
    assert by_name["tiny-mistral:F32"][3:5] == ["F32", "mistral"]

    info = json.loads(_ok(cli(home, "show", "tiny-mistral:F32", "--ctx", "512", "--json")))
    assert (info["name"], info["architecture"], info["ctx"]) == ("tiny-mistral:F32", "mistral", 512)
    assert info["kv_bytes"] == 2 * 2 * 2 * 16 * 512 * 4  # K+V x layers x kv heads x head_dim x ctx x f32
    assert info["fits"] is True and info["memory_needed"] == info["weight_bytes_cpu"] + info["kv_bytes"]
    assert "{%" in info["chat_template"]  # the built-in fallback: the file has none

    res = cli(home, "quantize", "tiny-mistral:F32", "--to", "q4_0", "--no-check")
    assert "stored tiny-mistral:F32-Q4_0: " in _ok(res)
    assert "weights" in res.stderr and "100.0%" in res.stderr
    m = ModelStore(home / "store").lookup("tiny-mistral:F32-Q4_0")
    assert (m.quantization, m.extra["quantized_from"]) == ("Q4_0", "tiny-mistral:F32")

    out = _ok(cli(home, "rm", "tiny-mistral:F32", "tiny-mistral:F32-Q4_0"))
    assert "deleted tiny-mistral:F32 (freed " in out and "deleted tiny-mistral:F32-Q4_0" in out
    assert [r.split()[0] for r in _ok(cli(home, "ls")).splitlines()[1:]] == ["gemma3:270m"]
    assert len(list((home / "store" / "blobs").iterdir())) == 1  # only the default's
    assert not list((home / "store" / "partial").iterdir())


def test_bad_input_fails_clearly_and_changes_nothing(home, tiny_gguf, tmp_path):
    _ok(cli(home, "ls"))  # registers the default
    before = store_state(ModelStore(home / "store"))
    not_gguf = tmp_path / "notes-Q8_0.gguf"
    not_gguf.write_text("not a model\n" * 100)
    full_disk = {"LOCALSERVE_DISK_RESERVE": "1P"}

    _fails(cli(home, "pull", str(tiny_gguf), **full_disk), "pull", "not enough disk space")
    _fails(cli(home, "quantize", "gemma3:270m", "--to", "Q8_0", "--no-check", **full_disk), "quantize",
           "not enough disk space")
    _fails(cli(home, "pull", str(not_gguf)), "pull", "not a usable GGUF file")
    _fails(cli(home, "pull", "./no/such/model.gguf"), "pull", "no such file or folder")
    _fails(cli(home, "pull", "test-org/anything"), "pull", "offline mode")
    _fails(cli(home, "quantize", str(tiny_gguf), "--to", "Q4_K"), "quantize", "cannot quantize a GGUF to 'Q4_K'")
    _fails(cli(home, "show", "nobody/nothing:Q4_0"), "show", "not in the store")
    _fails(cli(home, "rm", "nobody/nothing"), "rm", "not in the store")
    _fails(cli(home, "rm", "gemma3:270m"), "rm", "embedded default")
    _fails(cli(home, "pull", str(tiny_gguf), "--name", "../evil"), "pull", "invalid model name")
    _fails(cli(home, "ps", "--url", "http://127.0.0.1:9"), "ps", "no server answers at http://127.0.0.1:9")

    assert store_state(ModelStore(home / "store")) == before
    assert not list((home / "store" / "partial").iterdir())


def test_up_serves_a_store_name_and_ps_lists_it(home, tmp_path):
    from tests.server.conftest import start_server
    from tests.store.hf_folders import write_hf_folder

    folder = write_hf_folder(tmp_path / "tiny-llama", "llama")
    _ok(cli(home, "pull", str(folder), "--name", "tiny-llama:hf", "--quiet"))
    server = start_server(
        ["tiny-llama:hf", "--threads", "1", "--api-key", "k1", "--kv-memory", "0.05", "--ctx", "512"], tmp_path / "up.log",
        env={"LOCALSERVE_HOME": str(home)}, ready_timeout=120,
    )
    try:
        _fails(cli(home, "ps", "--url", server.url), "ps", "wants an API key")
        rows = _ok(cli(home, "ps", "--url", server.url, LOCALSERVE_API_KEY="k1")).splitlines()
        assert rows[0].split() == ["NAME", "SIZE", "QUANT", "CONTEXT", "LOADED"]
        name, *rest = rows[1].split()
        assert name == "tiny-llama:hf" and "F32" in rest and "ago" in rest
        (card,) = json.loads(_ok(cli(home, "ps", "--url", server.url + "/v1", "--api-key", "k1", "--json")))
        assert card["name"] == "tiny-llama:hf" and card["status"] == "ready"
        assert card["size"] == ModelStore(home / "store").lookup("tiny-llama:hf").size
        assert card["context"] == 512
    finally:
        server.stop()


def test_disk_reserve_setting(monkeypatch, tmp_path):
    from localserve.store.disk import DEFAULT_RESERVE, check_free_space, disk_reserve
    from localserve.store.store import StoreError

    monkeypatch.delenv("LOCALSERVE_DISK_RESERVE", raising=False)
    assert disk_reserve() == DEFAULT_RESERVE
    for text, want in (("0", 0), ("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("1P", 1 << 50)):
        monkeypatch.setenv("LOCALSERVE_DISK_RESERVE", text)
        assert disk_reserve() == want, text
    with pytest.raises(StoreError, match="needs 1 B and 1125.9 TB kept free"):
        check_free_space(tmp_path, 1)
    monkeypatch.setenv("LOCALSERVE_DISK_RESERVE", "0")
    check_free_space(tmp_path, 1)
    monkeypatch.setenv("LOCALSERVE_DISK_RESERVE", "lots")
    with pytest.raises(StoreError, match="LOCALSERVE_DISK_RESERVE='lots'"):
        disk_reserve()
