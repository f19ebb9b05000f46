"""Snapshots (pytest-textual-snapshot) of every screen against the real tiny server.

What varies from run to run or machine to machine is pinned first: the header's URL (a free
port), the store's modification dates, and on the Monitor the server line (CPU name, KV pool
from free RAM) and the lifetime totals (what earlier tests generated); the Pilot tests check
those texts against the server. Regenerate with `pytest tests/tui/test_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.tui.conftest import KEY, until

SIZE = (110, 34)
AUTH = {"Authorization": f"Bearer {KEY}"}
FIXED_DATE = "2026-01-02T03:04:05+00:00"


@pytest.fixture
def store_for_snapshots(tui_server, tiny_file):
    """The store holds exactly the embedded default and tuimodel:Q8_0, with fixed dates."""
    from localserve.store.names import StoreName
    from localserve.store.store import ModelStore

    httpx.post(tui_server.url + "/api/pull", headers=AUTH, json={"ref": str(tiny_file)}, timeout=60)
    wanted = {"gemma3:270m", "tuimodel:Q8_0"}
    for _ in range(200):
        listing = httpx.get(tui_server.url + "/api/models", headers=AUTH, timeout=60).json()
        names = {m["name"] for m in listing["models"]}
        if wanted <= names:
            break
        time.sleep(0.05)
    for name in names - wanted:
        httpx.delete(f"{tui_server.url}/api/models/{name}", headers=AUTH)
    store = ModelStore()
    for m in store.list():
        m.created = FIXED_DATE
        with store.lock():
            store.write_manifest(m)
        assert store.get(StoreName(m.name, m.tag)).created == FIXED_DATE
    return tui_server


def make_app(url: str):
    from localserve.tui.app import LocalServeApp

    return LocalServeApp(url, api_key=KEY)


async def ready(pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: app.server_state == "ready" and app.events_live, what="the connection")
    app.sub_title = "http://127.0.0.1:8000 · ready · random:tiny-llama"
    app._show_state = lambda: None  # the subtitle stays pinned


def test_models_snapshot(snap_compare, store_for_snapshots):
    async def run_before(pilot):
        await ready(pilot)
        screen = pilot.app.screen
        await until(pilot, lambda: len(screen.rows) == 2, what="the table")
        await until(pilot, lambda: "tensors" in str(screen.query_one("#details-text").render()), what="details")

    assert snap_compare(make_app(store_for_snapshots.url), run_before=run_before, terminal_size=SIZE)


def test_pull_snapshot(snap_compare, tui_server):
    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("f3")
        await pilot.click("#pull-ref")
        await pilot.press(*"org/model:Q4_K_M")

    assert snap_compare(make_app(tui_server.url), run_before=run_before, terminal_size=SIZE)


def test_quantize_snapshot(snap_compare, store_for_snapshots):
    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("f4")
        screen = pilot.app.screen
        await until(pilot, lambda: "tuimodel:Q8_0" in screen.models, what="the sources")
        screen.query_one("#source").value = "tuimodel:Q8_0"
        await pilot.pause(0.1)
        screen.query_one("#target").value = "Q4_0"
        await until(pilot, lambda: "KB" in str(screen.query_one("#estimate").render()), what="the estimate")

    assert snap_compare(make_app(store_for_snapshots.url), run_before=run_before, terminal_size=SIZE)


def test_monitor_snapshot(snap_compare, tui_server):
    async def run_before(pilot):
        from localserve.tui.monitor_data import MonitorData

        await ready(pilot)
        app = pilot.app
        await pilot.press("f5")
        screen = app.screen
        # an idle server: start the plots from its first quiet second
        await until(pilot, lambda: app.data.last_stats and app.data.last_stats["tok_s"] == 0
                    and app.data.last_stats["queue_peak"] == 0, what="an idle second")
        app.data = MonitorData()
        await until(pilot, lambda: app.data.last_stats is not None, what="a stats event")
        screen.poll_timer.pause()
        screen.status_timer.pause()
        await pilot.pause(0.1)  # a status fetch in flight lands before the pinning
        screen.on_data()
        screen.query_one("#server-info").update("random:tiny-llama  llama on cpu (this CPU)  ·  context 2048")
        screen.query_one("#totals").update("(lifetime totals: checked by the Pilot tests)")

    assert snap_compare(make_app(tui_server.url), run_before=run_before, terminal_size=SIZE)


def test_help_snapshot(snap_compare, tui_server):
    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("f1")

    assert snap_compare(make_app(tui_server.url), run_before=run_before, terminal_size=SIZE)
