"""Quantize: a store model to another GGUF type (GGUF sources: every type gguf-py writes; HF
folders: F32/F16/BF16/Q8_0), with the estimated size first and progress while it runs."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, RichLog, Select, Static

from localserve.tui.client import NoServerError, ServerError
from localserve.tui.common import JobPanel, JobScreen, format_bytes


class QuantizeScreen(JobScreen):
    DEFAULT_CSS = """
    QuantizeScreen #quantize-form { height: auto; margin: 1 1 0 1; }
    QuantizeScreen #quantize-form Select, QuantizeScreen #quantize-form Input { margin-bottom: 1; }
    QuantizeScreen #quantize-buttons { height: auto; }
    QuantizeScreen #quantize-buttons Button { margin-right: 2; }
    QuantizeScreen #estimate { height: auto; margin-bottom: 1; }
    QuantizeScreen #quantize-log { height: 1fr; border-top: solid $primary; margin: 1 1 0 1; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, dict] = {}
        self.types: dict[str, list[str]] = {"gguf": [], "hf": []}

    def body(self) -> ComposeResult:
        with Vertical(id="quantize-form"):
            yield Label("Source model", classes="title")
            yield Select([], id="source", prompt="choose a model from the store")
            yield Label("Target type", classes="title")
            yield Select([], id="target", prompt="choose a type")
            yield Label("Store name (optional, NAME[:TAG]; default <source>-<TYPE>)", classes="title")
            yield Input(placeholder="derived from the source", id="quantize-name")
            yield Static("estimated size: choose a source and a type", id="estimate", classes="muted")
            with Horizontal(id="quantize-buttons"):
                yield Button("Quantize", id="quantize-start", variant="primary")
                yield Button("Cancel", id="cancel", variant="error", disabled=True)
        yield JobPanel(id="job")
        yield RichLog(id="quantize-log", markup=True, wrap=True)

    async def reload(self) -> None:
        try:
            models = await self.app.client.models()
            if not self.types["gguf"]:
                self.types = await self.app.client.quantize_types()
        except (NoServerError, ServerError) as exc:
            self.query_one("#estimate", Static).update(str(exc))
            return
        self.models = {m["name"]: m for m in models}
        source = self.query_one("#source", Select)
        keep = source.value if source.value in self.models else Select.BLANK
        source.set_options([(f"{m['name']}  ({m['quantization']}, {format_bytes(m['size'])})", m["name"])
                            for m in models])
        if keep is not Select.BLANK:
            source.value = keep

    @on(Select.Changed, "#source")
    def source_changed(self) -> None:
        source = self.source
        target = self.query_one("#target", Select)
        previous = target.value
        kinds = self.types["hf" if source and self.models[source]["format"] == "hf" else "gguf"]
        target.set_options([(t, t) for t in kinds])
        if previous in kinds:
            target.value = previous
        self.update_estimate()

    @on(Select.Changed, "#target")
    def target_changed(self) -> None:
        self.update_estimate()

    @property
    def source(self) -> str | None:
        v = self.query_one("#source", Select).value
        return v if isinstance(v, str) else None

    @property
    def target(self) -> str | None:
        v = self.query_one("#target", Select).value
        return v if isinstance(v, str) else None

    @work(exclusive=True, group="estimate")
    async def update_estimate(self) -> None:
        label = self.query_one("#estimate", Static)
        if not (self.source and self.target):
            label.update("estimated size: choose a source and a type")
            return
        try:
            est = await self.app.client.estimate(self.source, self.target)
        except (NoServerError, ServerError) as exc:
            label.update(f"[red]{exc}[/red]")
            return
        ratio = est["estimated_bytes"] / est["source_bytes"] if est["source_bytes"] else 0
        label.update(f"estimated size: {format_bytes(est['estimated_bytes'])} "
                     f"({ratio:.0%} of the source's {format_bytes(est['source_bytes'])})")

    @on(Button.Pressed, "#quantize-start")
    async def start(self) -> None:
        if self.panel.running:
            self.notify("a quantization is already running", severity="warning")
            return
        if not (self.source and self.target):
            self.notify("choose a source and a target type first", severity="warning")
            return
        name = self.query_one("#quantize-name", Input).value.strip() or None
        await self.start_job(self.app.client.quantize(self.source, self.target, name),
                             f"quantizing {self.source} to {self.target}")

    def job_ended(self, job: dict) -> None:
        log = self.query_one(RichLog)
        if job["state"] == "done":
            r = job["result"]
            types = ", ".join(f"{k} x{v}" for k, v in sorted(r["types"].items()))
            log.write(f"[green]stored {r['name']}[/green]: {format_bytes(r['size'])} "
                      f"(source tensors {format_bytes(r['source_bytes'])}; {types})")
        elif job["state"] == "failed":
            log.write(f"[red]quantize failed: {job['error']}[/red]")
        else:
            log.write(f"[yellow]quantize cancelled[/yellow]: {job.get('message', '')}")
