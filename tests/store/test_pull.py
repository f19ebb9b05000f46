"""`localserve pull` against a local hub (real HTTP, real huggingface_hub), URLs and paths."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from localserve.cli import main
from localserve.store.names import parse_name
from tests.store._util import store_state
from tests.store.hub import HubFile

REPO = "test-org/tiny-GGUF"


def _publish(hub, tiny_gguf, tiny_f32_gguf, **faults):
    return hub.add(
        REPO,
        {
            "tiny-mistral-Q8_0.gguf": HubFile(tiny_gguf.read_bytes(), **faults),
            "tiny-mistral-F32.gguf": HubFile(tiny_f32_gguf.read_bytes()),
            "README.md": HubFile(b"# tiny\n", lfs=False),
        },
    )


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_pull_end_to_end_then_ls_show_load(hub, tiny_gguf, tiny_f32_gguf, default_store, capsys):
    from localserve.models.loader import load_weights
    from localserve.runtime.default_model import resolve_model_ref

    _publish(hub, tiny_gguf, tiny_f32_gguf)
    rc, out, err = _run(capsys, "pull", f"{REPO}:Q8_0")
    assert rc == 0, err
    assert f"pulled {REPO}:Q8_0" in out
    m = default_store.get(parse_name(f"{REPO}:Q8_0"))
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert m.files[0].sha256 == sha and default_store.has_blob(sha)
    assert (m.architecture, m.quantization, m.format) == ("mistral", "Q8_0", "gguf")
    assert m.source.startswith(f"hf://{REPO}@")
    # huggingface_hub's own requests: model_info, HEAD on resolve, GET of the bytes, with the token
    ours = [r for r in hub.requests if REPO in r.path]
    paths = [(r.method, r.path) for r in ours]
    assert ("GET", f"/api/models/{REPO}") in paths
    assert any(meth == "HEAD" and "/resolve/" in p for meth, p in paths)
    assert all(r.authorization == "Bearer hf_test_token" for r in ours)
    assert not list(default_store.root.joinpath("partial").iterdir())

    path = resolve_model_ref(f"{REPO}:Q8_0")
    assert path == str(default_store.blob_path(sha))
    assert load_weights(path).config.architecture == "mistral"

    rc, out, _ = _run(capsys, "ls")
    assert rc == 0 and f"{REPO}:Q8_0" in out and "gemma3:270m" in out
    rc, out, _ = _run(capsys, "show", f"{REPO}:Q8_0", "--ctx", "1024")
    assert rc == 0
    assert "mistral" in out and re.search(r"^fits +yes$", out, re.M)
    # K and V x 2 layers x 2 kv heads x 16 dims x 1024 tokens x float32 = 512 KiB
    assert "KV cache @ 1024    524.3 KB (float32)" in out
    assert "chat template (none in the file; localserve's built-in 'mistral')" in out
    rc, out, _ = _run(capsys, "show", f"{REPO}:Q8_0", "--ctx", str(1 << 40))
    assert rc == 0 and re.search(r"^fits +no: ", out, re.M)

    # the same bytes under another name: no second blob
    before = store_state(default_store)[1]
    rc, _, err = _run(capsys, "pull", f"{REPO}:tiny-mistral-Q8_0.gguf", "--name", "tiny:again")
    assert rc == 0, err
    assert store_state(default_store)[1] == before

    rc, out, _ = _run(capsys, "rm", f"{REPO}:Q8_0")
    assert rc == 0 and "freed 0 B" in out  # tiny:again still holds the blob
    rc, out, _ = _run(capsys, "rm", "tiny:again")
    assert rc == 0 and not default_store.has_blob(sha)


CHUNK = 10 << 20  # huggingface_hub writes what it receives in chunks of this size


def test_pull_resumes_after_the_connection_is_cut(hub, big_gguf, default_store, capsys):
    hub.add(REPO, {"big-F32.gguf": HubFile(big_gguf.read_bytes(), cut_after=CHUNK + 4_000_000)})
    rc, out, err = _run(capsys, "pull", REPO, "--name", "resumed:one")
    assert rc == 0, err
    assert [g.range for g in hub.gets("big-F32.gguf")] == [None, f"bytes={CHUNK}-"]
    m = default_store.get(parse_name("resumed:one"))
    assert m.files[0].sha256 == hashlib.sha256(big_gguf.read_bytes()).hexdigest()
    default_store.remove("resumed:one")


def test_pull_resumes_in_a_second_run(hub, big_gguf, default_store, capsys):
    f = HubFile(big_gguf.read_bytes(), cut_after=CHUNK + 4_000_000, status_after_cut=503)
    hub.add(REPO, {"big-F32.gguf": f})
    before = store_state(default_store)
    rc, _, err = _run(capsys, "pull", REPO, "--name", "resumed:two")
    assert rc == 1 and "HTTP 503" in err and "resume" in err
    assert store_state(default_store) == before
    partials = list(default_store.root.joinpath("partial").iterdir())
    assert [p.stat().st_size for p in partials] == [CHUNK]

    f.status_after_cut = None
    rc, _, err = _run(capsys, "pull", REPO, "--name", "resumed:two")
    assert rc == 0, err
    assert hub.gets("big-F32.gguf")[-1].range == f"bytes={CHUNK}-"
    assert not list(default_store.root.joinpath("partial").iterdir())
    default_store.remove("resumed:two")


@pytest.mark.parametrize(
    "faults, ref, message",
    [
        ({"corrupt": True}, REPO + ":Q8_0", "sha256 mismatch"),
        ({"cut_after": 50_000, "status_after_cut": 404}, REPO + ":Q8_0", "HTTP 404"),
        ({"get_status": 404}, REPO + ":Q8_0", "HTTP 404"),
        ({"advertised_size": 1 << 60}, REPO + ":Q8_0", "not enough disk space"),
        ({}, "test-org/no-such-repo", "repository test-org/no-such-repo not found"),
        ({}, REPO + ":missing.gguf", "has no file 'missing.gguf'"),
        ({}, REPO + ":Q4_K_M", "has no Q4_K_M GGUF (available: F32, Q8_0)"),
        ({}, REPO + ":banana", "neither a .gguf file name nor a quantization label"),
        ({}, REPO, "several GGUF files: name one"),
        ({}, REPO + ":README.md", "neither a .gguf"),
    ],
)
def test_bad_pulls_fail_clearly_and_leave_the_store_unchanged(
    hub, tiny_gguf, tiny_f32_gguf, default_store, capsys, faults, ref, message
):
    _publish(hub, tiny_gguf, tiny_f32_gguf, **faults)
    before = store_state(default_store)
    rc, out, err = _run(capsys, "pull", ref)
    assert rc == 1 and out == ""
    last = err.strip().splitlines()[-1]  # one line of ours, no traceback
    assert last.startswith("localserve pull: ") and message in last
    assert store_state(default_store) == before
    assert not list(default_store.root.joinpath("partial").iterdir())


def test_non_gguf_file_is_refused(hub, default_store, capsys):
    hub.add(REPO, {"notes.gguf": HubFile(b"this is not a gguf file" * 100)})
    before = store_state(default_store)
    rc, _, err = _run(capsys, "pull", REPO + ":notes.gguf")
    assert rc == 1 and "not a usable GGUF file" in err
    rc, _, err = _run(capsys, "pull", f"{hub.url}/{REPO}/resolve/main/notes.gguf")
    assert rc == 1 and "not a usable GGUF file" in err
    assert store_state(default_store) == before
    assert not list(default_store.root.joinpath("partial").iterdir())


def test_no_network_and_offline_mode(hub, default_store, capsys, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    rc, _, err = _run(capsys, "pull", REPO)
    assert rc == 1 and "cannot reach" in err
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = _run(capsys, "pull", REPO)
    assert rc == 1 and "offline mode" in err
    assert not [r for r in hub.requests if REPO in r.path]


def test_pull_url_with_sha_and_local_path(hub, tiny_gguf, tiny_f32_gguf, default_store, capsys, tmp_path):
    _publish(hub, tiny_gguf, tiny_f32_gguf)
    sha = hashlib.sha256(tiny_f32_gguf.read_bytes()).hexdigest()
    url = f"{hub.url}/{REPO}/resolve/main/tiny-mistral-F32.gguf"
    rc, out, err = _run(capsys, "pull", f"{url}#sha256={'0' * 64}")
    assert rc == 1 and "sha256 mismatch" in err
    rc, out, err = _run(capsys, "pull", f"{url}#sha256={sha}")
    assert rc == 0, err
    assert "pulled tiny-mistral:F32" in out
    # no token leaves for a plain URL
    assert hub.gets("tiny-mistral-F32.gguf")[-1].authorization is None

    local = tmp_path / "my-model-Q8_0.gguf"
    local.write_bytes(tiny_gguf.read_bytes())
    rc, out, err = _run(capsys, "pull", str(local))
    assert rc == 0, err and "pulled my-model:Q8_0" in out
    m = default_store.get(parse_name("my-model:Q8_0"))
    assert m.source == str(local)
    # a copy, not a link: changing the user's file leaves the store intact
    assert os.stat(local).st_ino != default_store.blob_path(m.files[0].sha256).stat().st_ino
    for name in ("tiny-mistral:F32", "my-model:Q8_0"):
        default_store.remove(name)


def test_offline_mode_imports_from_the_hf_cache(hub, tiny_gguf, tiny_f32_gguf, default_store, capsys, monkeypatch, tmp_path):
    from huggingface_hub import hf_hub_download

    _publish(hub, tiny_gguf, tiny_f32_gguf)
    cache = tmp_path / "hf-cache"
    hf_hub_download(REPO, "tiny-mistral-Q8_0.gguf", cache_dir=cache, endpoint=hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    rc, out, err = _run(capsys, "pull", REPO + ":Q8_0", "--name", "offline:one")
    assert rc == 0, err
    assert not [r for r in hub.requests if REPO in r.path]
    m = default_store.lookup("offline:one")
    assert m.files[0].sha256 == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert m.source.startswith("hf-cache://")
    rc, _, err = _run(capsys, "pull", REPO + ":F32")  # not in the cache
    assert rc == 1 and "offline mode" in err
    default_store.remove("offline:one")


def test_progress_reaches_the_callback_and_a_second_pull_waits_its_turn(hub, big_gguf, tmp_path):
    import fcntl

    from localserve.store.pull import PullOptions, pull
    from localserve.store.store import ModelStore, StoreError

    hub.add(REPO, {"big-F32.gguf": HubFile(big_gguf.read_bytes())})
    store = ModelStore(tmp_path)
    sha = hashlib.sha256(big_gguf.read_bytes()).hexdigest()
    # another process holds the partial file: this pull refuses instead of interleaving bytes
    with open(store.partial_path(f"sha256-{sha}.part"), "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="being downloaded by another pull"):
            pull(REPO, store, PullOptions(show_progress=False))
    seen = []
    m = pull(REPO, store, PullOptions(on_progress=lambda done, total: seen.append((done, total)), show_progress=False))
    size = big_gguf.stat().st_size
    assert seen[-1] == (size, size) and len(seen) >= 3
    assert m.files[0].sha256 == sha


def test_progress_bar_line():
    import io

    from localserve.store.progress import ProgressBar

    bar = ProgressBar(total=200_000_000, desc="model.gguf", stream=io.StringIO())
    bar._t0 -= 10  # ten seconds in
    bar.update(50_000_000)
    line = bar.line()
    assert line.startswith("model.gguf  50.0 MB / 200.0 MB  25.0%")
    assert "5.0 MB/s" in line and "ETA 0:30" in line


def test_lfs_redirect_to_a_cdn_gets_no_token(hub, tiny_gguf, default_store, capsys):
    hub.add(REPO, {"tiny-Q8_0.gguf": HubFile(tiny_gguf.read_bytes(), cdn=True)})
    rc, _, err = _run(capsys, "pull", REPO, "--name", "cdn:one", "--quiet")
    assert rc == 0, err
    cdn_gets = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert [r.method for r in cdn_gets] == ["GET"]
    assert cdn_gets[0].authorization is None  # the token stays with the hub
    assert all(r.authorization for r in hub.requests if REPO in r.path)
    default_store.remove("cdn:one")


def test_a_cancelled_pull_keeps_its_partial_file_and_resumes(hub, big_gguf, tmp_path):
    from localserve.store.pull import PullOptions, pull
    from localserve.store.store import ModelStore

    class Cancelled(Exception):
        pass

    def cancel_after_a_chunk(done: int, total: int | None) -> None:
        if done > CHUNK:  # the callback sees a chunk before it is written: the first one is on disk
            raise Cancelled

    hub.add(REPO, {"big-F32.gguf": HubFile(big_gguf.read_bytes())})
    store = ModelStore(tmp_path)
    before = store_state(store)
    with pytest.raises(Cancelled):
        pull(REPO, store, PullOptions(on_progress=cancel_after_a_chunk, show_progress=False))
    assert store_state(store) == before
    (partial,) = (tmp_path / "partial").iterdir()
    assert partial.stat().st_size == CHUNK
    m = pull(REPO, store, PullOptions(show_progress=False))
    assert hub.gets("big-F32.gguf")[-1].range == f"bytes={CHUNK}-"
    assert m.files[0].sha256 == hashlib.sha256(big_gguf.read_bytes()).hexdigest()
    assert not list((tmp_path / "partial").iterdir())
