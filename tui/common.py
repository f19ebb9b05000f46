"""What every screen shares: Header + body + Footer, reload on show, redraw when the event
stream brought something new; the job-progress panel of the Pull and Quantize screens."""

from __future__ import annotations

from typing import Awaitable

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, ProgressBar, RichLog, Static

from localserve.store.progress import format_bytes, format_seconds
from localserve.tui.client import NoServerError, ServerError

POLL_SECONDS = 0.25


def format_params(n: int) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_count(n: float, unit: str) -> str:
    if unit == "B":
        return format_bytes(n)
    for suffix in ("", "k", "M", "G"):
        if abs(n) < 1000 or suffix == "G":
            return f"{n:.1f}{suffix} {unit}" if suffix else f"{n:.0f} {unit}"
        n /= 1000
    raise AssertionError


class ServerScreen(Screen):
    """A screen over the app's server client and its event data (`self.app.data`)."""

    def compose(self) -> ComposeResult:
        yield Header()
        yield from self.body()
        yield Footer()

    def body(self) -> ComposeResult:
        yield from ()

    def on_mount(self) -> None:
        self._seen_version = -1
        self.poll_timer = self.set_interval(POLL_SECONDS, self._poll)

    async def on_screen_resume(self) -> None:
        await self.reload()

    async def reload(self) -> None:
        """Fetch what the screen shows from the server (on show, after an action)."""

    def on_data(self) -> None:
        """The event stream changed app.data."""

    def _poll(self) -> None:
        if self.is_current and self.app.data.version != self._seen_version:
            self._seen_version = self.app.data.version
            self.on_data()


class JobPanel(Vertical):
    """One pull or quantize job: a progress bar and a line of done / total, rate, ETA, outcome."""

    DEFAULT_CSS = """
    JobPanel { height: auto; padding: 0 1; margin-top: 1; }
    JobPanel ProgressBar { display: none; }
    JobPanel.started ProgressBar { display: block; }
    JobPanel #job-line { height: auto; }
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.job: dict | None = None

    def compose(self) -> ComposeResult:
        yield ProgressBar(total=None, show_eta=False, id="job-bar")
        yield Static("no job yet", id="job-line", classes="muted")

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.get("state") == "running"

    def show(self, job: dict) -> None:
        self.job = job
        self.add_class("started")  # an idle bar would pulse (indeterminate): shown from the first job
        bar = self.query_one("#job-bar", ProgressBar)
        total, done, unit = job.get("total"), job.get("done", 0), job.get("unit", "B")
        if total:
            bar.update(total=total, progress=done)
        elif job["state"] != "running":
            bar.update(total=1, progress=1 if job["state"] == "done" else 0)
        self.query_one("#job-line", Static).update(job_line(job, done, total, unit))


def job_line(job: dict, done: int, total: int | None, unit: str) -> str:
    state = job["state"]
    if state == "done":
        r = job.get("result") or {}
        size = f" ({format_bytes(r['size'])})" if r.get("size") is not None else ""
        return f"done: {r.get('name', '')}{size}"
    if state == "failed":
        return f"failed: {job.get('error')}"
    if state == "cancelled":
        return f"cancelled: {job.get('message') or 'the store is unchanged'}"
    parts = [f"{format_count(done, unit)} / {format_count(total, unit)}" if total else format_count(done, unit)]
    if job.get("rate"):
        parts.append(f"{format_count(job['rate'], unit)}/s")
    if job.get("eta_s") is not None:
        parts.append(f"ETA {format_seconds(job['eta_s'])}")
    if job.get("message"):
        parts.append(job["message"])
    return "  ".join(parts)


class JobScreen(ServerScreen):
    """A screen that runs one job at a time in a JobPanel (#job) with a #cancel button. Job
    progress comes from the event stream; while the stream is down, from polling the job."""

    BINDINGS = [("escape", "cancel", "Cancel job")]

    def on_mount(self) -> None:
        self.set_interval(1.0, self._poll_job_without_events)

    @property
    def panel(self) -> JobPanel:
        return self.query_one("#job", JobPanel)

    def track(self, job: dict) -> None:
        self.app.data.jobs[job["id"]] = job
        self.panel.show(job)
        self.query_one("#cancel").disabled = False

    async def start_job(self, request: Awaitable[dict], started: str) -> None:
        """Submits a job (`request`: the client call), tracks it and logs `started (id)`; a
        server that refuses it or is gone is said in the log."""
        log = self.query_one(RichLog)
        try:
            job = await request
        except (NoServerError, ServerError) as exc:
            log.write(f"[red]{exc}[/red]")
            return
        self.track(job)
        log.write(f"{started} ({job['id']})")

    @on(Button.Pressed, "#cancel")
    async def cancel_pressed(self) -> None:
        await self.action_cancel()

    async def action_cancel(self) -> None:
        job = self.panel.job
        if job is None or job["state"] != "running":
            return
        try:
            await self.app.client.cancel_job(job["id"])
        except Exception as exc:  # NoServerError, ServerError: shown, the job goes on
            self.notify(str(exc), severity="error")

    def on_data(self) -> None:
        job = self.panel.job
        if job is None:
            return
        latest = self.app.data.jobs.get(job["id"], job)
        was_running = job["state"] == "running"
        self.panel.show(latest)
        if was_running and latest["state"] != "running":
            self.query_one("#cancel").disabled = True
            self.job_ended(latest)

    def job_ended(self, job: dict) -> None:
        """The tracked job finished (done, failed or cancelled)."""

    async def _poll_job_without_events(self) -> None:
        job = self.panel.job
        if job is None or job["state"] != "running" or self.app.events_live:
            return
        try:
            latest = await self.app.client.job(job["id"])
        except Exception:  # the server is gone too: the app's reconnect loop says so
            return
        self.app.data.jobs[latest["id"]] = latest
        self.app.data.version += 1
