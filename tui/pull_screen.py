"""Pull: a reference (HF repo, repo:QUANT, repo:file.gguf, URL or a path on the server's
machine) into the server's store, with live progress and cancel."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, RichLog

from localserve.tui.common import JobPanel, JobScreen, format_bytes

HINT = "org/name  ·  org/name:Q4_K_M  ·  org/name:file.gguf  ·  https://host/model.gguf  ·  /path/model.gguf"


class PullScreen(JobScreen):
    DEFAULT_CSS = """
    PullScreen #pull-form { height: auto; margin: 1 1 0 1; }
    PullScreen #pull-form Input { margin-bottom: 1; }
    PullScreen #pull-buttons { height: auto; }
    PullScreen #pull-buttons Button { margin-right: 2; }
    PullScreen #pull-log { height: 1fr; border-top: solid $primary; margin: 1 1 0 1; }
    """

    def body(self) -> ComposeResult:
        with Vertical(id="pull-form"):
            yield Label("Model reference (paths are on the server's machine)", classes="title")
            yield Input(placeholder=HINT, id="pull-ref")
            yield Label("Store name (optional, NAME[:TAG])", classes="title")
            yield Input(placeholder="derived from the reference", id="pull-name")
            with Horizontal(id="pull-buttons"):
                yield Button("Pull", id="pull-start", variant="primary")
                yield Button("Cancel", id="cancel", variant="error", disabled=True)
        yield JobPanel(id="job")
        yield RichLog(id="pull-log", markup=True, wrap=True)

    @on(Input.Submitted)
    @on(Button.Pressed, "#pull-start")
    async def start(self) -> None:
        if self.panel.running:
            self.notify("a pull is already running", severity="warning")
            return
        ref = self.query_one("#pull-ref", Input).value.strip()
        if not ref:
            self.notify("enter a model reference first", severity="warning")
            return
        name = self.query_one("#pull-name", Input).value.strip() or None
        await self.start_job(self.app.client.pull(ref, name), f"pulling {ref}")

    def job_ended(self, job: dict) -> None:
        log = self.query_one(RichLog)
        if job["state"] == "done":
            r = job["result"]
            log.write(f"[green]pulled {r['name']}[/green] ({format_bytes(r['size'])}, {r['architecture']}, "
                      f"{r['quantization']})")
        elif job["state"] == "failed":
            log.write(f"[red]pull failed: {job['error']}[/red]")
        else:
            log.write(f"[yellow]pull cancelled[/yellow]: {job.get('message', '')}")
