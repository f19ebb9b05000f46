"""A real `localserve up` (tiny random model, with an API key) shared by the TUI tests, and a
way to run the app against it under Textual's Pilot."""

from __future__ import annotations

import contextlib
import time

import pytest

from tests.server.conftest import start_server
from tests.tui.helpers import TINY_UP_ARGS, write_tiny_gguf

KEY = "tui-key"


@pytest.fixture(scope="session")
def tui_server(localserve_home, tmp_path_factory):
    srv = start_server([*TINY_UP_ARGS, "--api-key", KEY], tmp_path_factory.mktemp("tui_server") / "up.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tui_files") / "tuimodel-Q8_0.gguf")


async def until(pilot, cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        await pilot.pause(0.05)


@contextlib.asynccontextmanager
async def running_app(url: str, size=(120, 40), api_key: str | None = KEY):
    from localserve.tui.app import LocalServeApp

    app = LocalServeApp(url, api_key=api_key)
    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: app.server_state == "ready" and app.events_live, what="the server connection")
        yield app, pilot
