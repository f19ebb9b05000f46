"""One real `localserve up` (the embedded default model) for all of tests/clients, and a fixture
that installs a client (cached per user and pinned version) and drives it for two turns through
a capturing proxy. Every test here carries the `clients` marker: `-m "not clients"` leaves them
out. An install that fails (no network) fails the tests; it never skips them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.clients.drivers import CLIENTS, SERVER_ARGS, Session, drive
from tests.clients.install import ClientInstallError, ensure_installed
from tests.clients.proxy import CapturingProxy
from tests.server.conftest import Server, start_server


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/clients/" in item.nodeid:
            item.add_marker(pytest.mark.clients)


@pytest.fixture(scope="package")
def clients_server(tmp_path_factory, request):
    """Started once for the package, stopped after its last test: a cold Claude Code prompt is
    ~23k tokens, so the three clients share one loaded model (their prefixes differ anyway).
    LOCALSERVE_CLIENTS_URL=http://HOST:PORT drives a server that is already up instead."""
    if url := os.environ.get("LOCALSERVE_CLIENTS_URL"):
        yield Server(None, url.rstrip("/"), None)
        return
    request.getfixturevalue("default_gguf")
    srv = start_server(SERVER_ARGS, tmp_path_factory.mktemp("clients_server") / "up.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="package")
def drive_client(clients_server, tmp_path_factory):
    """drive_client("claude-code" | "codex" | "aider") -> Session: installs the client if needed,
    runs its two turns through a fresh proxy, returns what happened. The client's home, work dir
    and capture.jsonl go to a tmp dir, or under LOCALSERVE_CLIENTS_KEEP when that is set."""

    def run(name: str, **kwargs) -> Session:
        client_type = CLIENTS[name]
        try:
            exe = ensure_installed(client_type.spec)
        except ClientInstallError as exc:
            pytest.fail(f"could not install {name} for the client tests: {exc}", pytrace=False)
        if keep := os.environ.get("LOCALSERVE_CLIENTS_KEEP"):  # captures outlive pytest's tmp dirs
            root = Path(keep) / name
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        else:
            root = tmp_path_factory.mktemp(name)
        with CapturingProxy(clients_server.url, log=root / "capture.jsonl") as proxy:
            client = client_type(exe, root / "home", root / "work", proxy.url)
            return drive(client, proxy, clients_server.url, server_log=clients_server.log, **kwargs)

    return run
