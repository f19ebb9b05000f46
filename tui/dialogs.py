"""Modal dialogs: the no-server offer (start `localserve up`, retry, quit) and a yes/no confirm."""

from __future__ import annotations

import asyncio
import time

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from localserve.tui.client import NoServerError, is_local_url

START_TIMEOUT = 600.0  # a first start may assemble the embedded model and load it

MODAL_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{
    width: 72; height: auto; border: thick $primary; background: $surface; padding: 1 2;
}}
{name} Horizontal {{ height: auto; margin-top: 1; }}
{name} Button {{ margin-right: 2; }}
"""


class NoServerScreen(ModalScreen[str]):
    """Dismissed with "started", "retry" or "quit"."""

    DEFAULT_CSS = MODAL_CSS.format(name="NoServerScreen") + """
    NoServerScreen #start-log { color: $text-muted; height: auto; max-height: 10; }
    """
    BINDINGS = [("escape", "quit", "Quit")]

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def compose(self) -> ComposeResult:
        local = is_local_url(self.url)
        with Vertical():
            yield Label(f"No localserve server answers at {self.url}.", id="no-server-message")
            yield Static(
                "Start one here? The TUI runs `localserve up` and stops it again when it exits."
                if local else "That URL is on another machine: start `localserve up` there, then retry.",
                id="no-server-hint",
            )
            yield Static("", id="start-log")
            with Horizontal():
                yield Button("Start a server", id="start", variant="primary", disabled=not local)
                yield Button("Retry", id="retry")
                yield Button("Quit", id="quit", variant="error")

    @on(Button.Pressed, "#retry")
    def retry(self) -> None:
        self.dismiss("retry")

    @on(Button.Pressed, "#quit")
    def action_quit(self) -> None:
        self.dismiss("quit")

    @on(Button.Pressed, "#start")
    def start(self) -> None:
        self.query_one("#start", Button).disabled = True
        self.start_server()

    @work(exclusive=True)
    async def start_server(self) -> None:
        launcher, client = self.app.launcher, self.app.client
        log = self.query_one("#start-log", Static)
        launcher.start()
        log.update("starting: " + " ".join(launcher.command()[2:]))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not launcher.running:
                log.update(f"the server exited with {launcher.exit_code()}:\n{launcher.log_tail()}")
                self.query_one("#start", Button).disabled = False
                return
            try:
                health = await client.health()
            except NoServerError:
                pass
            else:
                if health.get("status") == "failed":
                    log.update(f"the model failed to load: {health.get('error', '')}")
                    return
                if health.get("status") == "ready":
                    self.dismiss("started")
                    return
                log.update(f"the server is up; loading {health.get('model', 'the model')}...")
            await asyncio.sleep(0.3)
        log.update(f"the server did not get ready in {START_TIMEOUT:.0f} s:\n{launcher.log_tail()}")


class ConfirmScreen(ModalScreen[bool]):
    DEFAULT_CSS = MODAL_CSS.format(name="ConfirmScreen")
    BINDINGS = [("y", "answer(True)", "Yes"), ("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Delete") -> None:
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, id="question")
            with Horizontal():
                yield Button(self.yes, id="yes", variant="error")
                yield Button("Cancel", id="no")

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
