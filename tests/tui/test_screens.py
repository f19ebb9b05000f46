"""Every screen driven through Textual's Pilot against a real server subprocess: real pulls,
quantizations, deletes and requests, checked on the screen and on the server."""

from __future__ import annotations

import asyncio

import httpx

from tests.tui.conftest import KEY, running_app, until
from tests.tui.helpers import SlowFileServer, big_gguf_bytes

AUTH = {"Authorization": f"Bearer {KEY}"}


def store_names(srv) -> list[str]:
    return [m["name"] for m in httpx.get(srv.url + "/api/models", headers=AUTH, timeout=60).json()["models"]]


def table_names(screen) -> list[str]:
    from textual.widgets import DataTable

    table = screen.query_one(DataTable)
    return [table.get_row_at(i)[0].removesuffix(" *") for i in range(table.row_count)]


def text_of(screen, selector: str) -> str:
    return str(screen.query_one(selector).render())


def log_text(screen, selector: str) -> str:
    """A RichLog's text with its wrapping undone."""
    return " ".join(" ".join(line.text for line in screen.query_one(selector).lines).split())


def test_pull_screen_pulls_a_model(tui_server, tiny_file):
    async def main():
        async with running_app(tui_server.url) as (app, pilot):
            await pilot.press("f3")
            screen = app.screen
            assert type(screen).__name__ == "PullScreen"
            await pilot.click("#pull-ref")
            await pilot.press(*str(tiny_file))
            await pilot.click("#pull-start")
            await until(pilot, lambda: screen.panel.job is not None and screen.panel.job["state"] != "running",
                        what="the pull")
            assert screen.panel.job["state"] == "done", screen.panel.job
            await until(pilot, lambda: "pulled tuimodel:Q8_0" in log_text(screen, "#pull-log"), what="the log line")
            assert "done: tuimodel:Q8_0" in text_of(screen, "#job-line")

    asyncio.run(main())
    assert "tuimodel:Q8_0" in store_names(tui_server)


def test_pull_screen_cancel(tui_server, tiny_file):
    files = SlowFileServer({"slow-Q8_0.gguf": big_gguf_bytes(tiny_file, pad_mb=24)}, rate=5_000_000)
    before = store_names(tui_server)

    async def main():
        async with running_app(tui_server.url) as (app, pilot):
            await pilot.press("f3")
            screen = app.screen
            screen.query_one("#pull-ref").value = files.url + "/slow-Q8_0.gguf"
            await pilot.click("#pull-start")
            await until(pilot, lambda: screen.panel.job and screen.panel.job["done"] > 0, what="pull progress")
            assert "MB" in text_of(screen, "#job-line") and not screen.query_one("#cancel").disabled
            await pilot.click("#cancel")
            await until(pilot, lambda: screen.panel.job["state"] != "running", what="the cancel")
            assert screen.panel.job["state"] == "cancelled"
            assert text_of(screen, "#job-line").startswith("cancelled")
            assert screen.query_one("#cancel").disabled

    try:
        asyncio.run(main())
    finally:
        files.stop()
    assert store_names(tui_server) == before


def test_pull_screen_reports_a_bad_reference(tui_server):
    async def main():
        async with running_app(tui_server.url) as (app, pilot):
            await pilot.press("f3")
            screen = app.screen
            screen.query_one("#pull-ref").value = "/no/such/model.gguf"
            await pilot.click("#pull-start")
            await until(pilot, lambda: screen.query_one("#pull-log").lines, what="the error")
            assert "no such file" in log_text(screen, "#pull-log")
            assert screen.panel.job is None

    asyncio.run(main())


def test_quantize_screen(tui_server, tiny_file):
    httpx.post(tui_server.url + "/api/pull", headers=AUTH, json={"ref": str(tiny_file)})

    async def main():
        async with running_app(tui_server.url) as (app, pilot):
            await until(pilot, lambda: "tuimodel:Q8_0" in store_names(tui_server), what="the source in the store")
            await pilot.press("f4")
            screen = app.screen
            await until(pilot, lambda: "tuimodel:Q8_0" in screen.models, what="the source list")
            screen.query_one("#source").value = "tuimodel:Q8_0"
            await pilot.pause(0.1)
            screen.query_one("#target").value = "Q4_0"
            await until(pilot, lambda: "estimated size:" in text_of(screen, "#estimate")
                        and "KB" in text_of(screen, "#estimate"), what="the estimate")
            await pilot.click("#quantize-start")
            await until(pilot, lambda: screen.panel.job and screen.panel.job["state"] != "running", what="the job")
            job = screen.panel.job
            assert job["state"] == "done", job
            assert job["result"]["name"] == "tuimodel:Q8_0-Q4_0"
            await until(pilot, lambda: "stored tuimodel:Q8_0-Q4_0" in log_text(screen, "#quantize-log"), what="the log")

    asyncio.run(main())
    assert "tuimodel:Q8_0-Q4_0" in store_names(tui_server)
    httpx.delete(tui_server.url + "/api/models/tuimodel:Q8_0-Q4_0", headers=AUTH)


def test_models_screen_sort_details_delete(tui_server, tiny_file):
    httpx.post(tui_server.url + "/api/pull", headers=AUTH,
               json={"ref": str(tiny_file), "name": "zz-deleteme:latest"}).raise_for_status()

    async def main():
        async with running_app(tui_server.url) as (app, pilot):
            screen = app.screen
            assert type(screen).__name__ == "ModelsScreen"
            await until(pilot, lambda: "zz-deleteme:latest" in table_names(screen), what="the table")
            names = table_names(screen)
            assert names == sorted(names) and "gemma3:270m" in names
            await pilot.press("s")  # next sort column: size, biggest first
            sizes = {m["name"]: m["size"] for m in screen.rows}
            assert [sizes[n] for n in table_names(screen)] == sorted(sizes.values(), reverse=True)
            assert table_names(screen)[0] == "gemma3:270m"
            await until(pilot, lambda: "gemma3:270m" in text_of(screen, "#details-text"), what="details")
            assert "embedded default" in text_of(screen, "#details-text")
            assert "layers        18" in text_of(screen, "#details-text")

            await pilot.click("#models-table", offset=(2, 0))  # the Name header: by name again
            assert (screen.sort_key, screen.sort_reverse) == ("name", False)
            await pilot.click("#models-table", offset=(2, 0))  # again: reversed
            assert table_names(screen) == sorted(table_names(screen), reverse=True)
            await pilot.click("#models-table", offset=(2, 0))
            table = screen.query_one("#models-table")
            table.move_cursor(row=table_names(screen).index("zz-deleteme:latest"))
            await until(pilot, lambda: "zz-deleteme:latest" in text_of(screen, "#details-text"), what="details")
            await pilot.press("d")
            await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen" and app.screen.query("#question"),
                        what="the confirmation")
            assert "zz-deleteme:latest" in text_of(app.screen, "#question")
            await pilot.press("n")  # no: nothing happens
            assert "zz-deleteme:latest" in store_names(tui_server)
            await pilot.press("d")
            await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen" and app.screen.query("#yes"),
                        what="the confirmation")
            await pilot.pause(0.05)
            await pilot.click("#yes")
            await until(pilot, lambda: "zz-deleteme:latest" not in table_names(screen), what="the delete")

            table.move_cursor(row=table_names(screen).index("gemma3:270m"))
            await pilot.press("d", "y")  # the embedded default stays, with a notification
            await until(pilot, lambda: any("embedded default" in n.message for n in app._notifications),
                        what="the refusal")
            assert "gemma3:270m" in table_names(screen)

    asyncio.run(main())
    names = store_names(tui_server)
    assert "zz-deleteme:latest" not in names and "gemma3:270m" in names


def test_monitor_screen_moves_under_load(tui_server):
    async def main():
        async with running_app(tui_server.url) as (app, pilot):
            await pilot.press("f5")
            screen = app.screen
            assert type(screen).__name__ == "MonitorScreen"
            await until(pilot, lambda: "random:tiny-llama" in text_of(screen, "#server-info"), what="the status")
            assert "cpu" in text_of(screen, "#server-info")

            async def load():
                async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
                    body = {"prompt": [1, 2, 3, 4], "max_tokens": 300, "temperature": 0, "ignore_eos": True}
                    return await asyncio.gather(*(c.post(tui_server.url + "/v1/completions", json=body)
                                                  for _ in range(3)))

            rs = await load()
            assert all(r.status_code == 200 for r in rs)
            log = screen.query_one("#request-log")
            await until(pilot, lambda: log.row_count >= 3, what="the request log")
            row = log.get_row_at(log.row_count - 1)
            assert row[4] == "300" and row[-1] == "length"
            await until(pilot, lambda: app.data.tok_s.peak() > 0, timeout=5, what="a tok/s point")
            await pilot.pause(0.5)
            assert screen.query_one("#plot-ttft Sparkline").data
            assert max(screen.query_one("#plot-tok-s Sparkline").data) > 0
            assert "requests" in text_of(screen, "#totals")

    asyncio.run(main())


def test_help_screen(tui_server):
    async def main():
        async with running_app(tui_server.url) as (app, pilot):
            await pilot.press("f1")
            assert type(app.screen).__name__ == "HelpScreen"
            md = app.screen.query_one("Markdown")
            assert "Monitor" in md.source and "Quantize" in md.source
            await pilot.press("f2")
            assert type(app.screen).__name__ == "ModelsScreen"

    asyncio.run(main())
