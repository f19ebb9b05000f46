"""No server at the URL: the TUI says so and starts `localserve up` on request, and stops it
again when it exits; a remote URL gets no start button."""

from __future__ import annotations

import asyncio
import time

from tests.server.conftest import free_port
from tests.tui.conftest import until
from tests.tui.helpers import TINY_UP_ARGS


def laid_out(app, selector: str) -> bool:
    found = app.screen.query(selector)
    return bool(found) and found.first().region.area > 0


def test_offers_to_start_a_server_and_stops_it_on_exit(localserve_home):
    from localserve.tui.app import LocalServeApp

    url = f"http://127.0.0.1:{free_port()}"
    app = LocalServeApp(url, up_args=TINY_UP_ARGS)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: type(app.screen).__name__ == "NoServerScreen", what="the offer")
            assert app.server_state == "down"
            assert f"No localserve server answers at {url}" in str(app.screen.query_one("#no-server-message").render())
            await until(pilot, lambda: laid_out(app, "#start"), what="the layout")
            await pilot.click("#start")
            await until(pilot, lambda: app.server_state == "ready" and app.events_live, timeout=180,
                        what=lambda: f"the started server ({app.server_state}, {app.screen}, "
                                     f"{app.launcher.log_tail()})")
            assert app.launcher.running
            assert type(app.screen).__name__ == "ModelsScreen"
            assert "random:tiny-llama" in app.sub_title
            first = app.launcher.proc
            # the server goes away: the offer comes back, and starts a new one
            first.terminate()
            t0 = time.monotonic()
            await until(pilot, lambda: type(app.screen).__name__ == "NoServerScreen", timeout=30, what="the offer")
            # the server ended the TUI's event stream at once instead of waiting out its grace period
            await until(pilot, lambda: first.poll() is not None, timeout=30, what="the first server's exit")
            assert time.monotonic() - t0 < 4.0 and first.returncode == 0
            assert app.server_state == "down"
            await until(pilot, lambda: laid_out(app, "#start"), what="the layout")
            await pilot.click("#start")
            await until(pilot, lambda: app.server_state == "ready" and app.events_live, timeout=180,
                        what=lambda: f"the second server ({app.server_state}, {app.screen}, "
                                     f"{app.screen.query('#start-log').first().render() if app.screen.query('#start-log') else ''}, "
                                     f"{app.launcher.log_tail()})")
            assert app.launcher.proc is not first and app.launcher.running
            await pilot.press("ctrl+q")

    asyncio.run(main())
    assert not app.launcher.running and app.launcher.exit_code() is not None


def test_remote_url_offers_retry_and_quit_only():
    from localserve.tui.app import LocalServeApp

    # 192.0.2.0/24 is TEST-NET-1: nothing answers there
    app = LocalServeApp("http://192.0.2.1:9", up_args=TINY_UP_ARGS)
    app.client._http.timeout = __import__("httpx").Timeout(0.5)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: type(app.screen).__name__ == "NoServerScreen", what="the no-server screen")
            await until(pilot, lambda: laid_out(app, "#quit"), what="the layout")
            assert app.screen.query_one("#start").disabled
            assert "another machine" in str(app.screen.query_one("#no-server-hint").render())
            await pilot.click("#quit")
            await pilot.pause(0.1)
        return app.return_code

    asyncio.run(main())
    assert not app.launcher.running and app.launcher.proc is None
