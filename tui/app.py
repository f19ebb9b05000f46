"""The Textual app: five screens (modes) over one server connection and one event stream."""

from __future__ import annotations

import asyncio

from textual import work
from textual.app import App
from textual.binding import Binding

from localserve.tui.client import DEFAULT_URL, NoServerError, ServerClient, ServerError
from localserve.tui.launcher import ServerLauncher
from localserve.tui.monitor_data import MonitorData
from localserve.tui.help_screen import HelpScreen
from localserve.tui.models_screen import ModelsScreen
from localserve.tui.monitor_screen import MonitorScreen
from localserve.tui.dialogs import NoServerScreen
from localserve.tui.pull_screen import PullScreen
from localserve.tui.quantize_screen import QuantizeScreen

RECONNECT_SECONDS = 1.0


class LocalServeApp(App):
    TITLE = "localserve"
    MODES = {
        "models": ModelsScreen,
        "pull": PullScreen,
        "quantize": QuantizeScreen,
        "monitor": MonitorScreen,
        "help": HelpScreen,
    }
    DEFAULT_MODE = "models"
    BINDINGS = [
        Binding("f1", "switch_mode('help')", "Help"),
        Binding("f2", "switch_mode('models')", "Models"),
        Binding("f3", "switch_mode('pull')", "Pull"),
        Binding("f4", "switch_mode('quantize')", "Quantize"),
        Binding("f5", "switch_mode('monitor')", "Monitor"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]
    CSS = """
    Screen { layout: vertical; }
    .title { text-style: bold; color: $accent; padding: 0 1; }
    .muted { color: $text-muted; }
    .error { color: $error; }
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, up_args: list[str] | None = None) -> None:
        super().__init__()
        self.url = url.rstrip("/")
        self.client = ServerClient(self.url, api_key)
        self.data = MonitorData()
        self.launcher = ServerLauncher(self.url, list(up_args or []))
        self.server_state = "connecting"  # connecting | loading | ready | failed | down
        self.server_model: str | None = None
        self.events_live = False

    # -- connection -----------------------------------------------------------------------
    def on_mount(self) -> None:
        self._show_state()
        self.check_server()

    @work(exclusive=True, group="connect")
    async def check_server(self) -> None:
        try:
            health = await self.client.health()
        except NoServerError:
            self.set_server_state("down")
            self.push_screen(NoServerScreen(self.url), self._after_no_server)
            return
        self.set_server_state(health.get("status", "ready"), health.get("model"))
        self.follow_events()

    def _after_no_server(self, outcome: str | None) -> None:
        if outcome == "quit":
            self.exit()
        else:  # started, or retry
            self.check_server()

    def set_server_state(self, state: str, model: str | None = None) -> None:
        self.server_state = state
        if model:
            self.server_model = model
        self._show_state()

    def _show_state(self) -> None:
        model = f" · {self.server_model}" if self.server_model else ""
        self.sub_title = f"{self.url} · {self.server_state}{model}"

    @work(exclusive=True, group="events")
    async def follow_events(self) -> None:
        """Feeds self.data from /api/events for the app's lifetime, reconnecting after a drop."""
        while True:
            try:
                async for ev in self.client.events():
                    if ev.type == "hello":
                        self.events_live = True
                        await self._refresh_health()
                    elif ev.type == "model_load":
                        self.set_server_state("ready", ev.data.get("name"))
                    elif ev.type == "model_unload":
                        self.set_server_state("stopping", ev.data.get("name"))
                    self.data.apply(ev.type, ev.data)
            except (NoServerError, ServerError):
                pass
            self.events_live = False
            try:
                await self.client.health()
            except NoServerError:  # the server went away: say so and offer to start one again
                self.set_server_state("down")
                self.push_screen(NoServerScreen(self.url), self._after_no_server)
                return
            self.set_server_state("reconnecting")
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _refresh_health(self) -> None:
        try:
            health = await self.client.health()
        except NoServerError:
            return
        self.set_server_state(health.get("status", "ready"), health.get("model"))

    # -- exit -----------------------------------------------------------------------------
    async def on_unmount(self) -> None:
        await self.client.aclose()
        self.launcher.stop()
