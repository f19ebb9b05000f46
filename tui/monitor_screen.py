"""Monitor: live plots of tok/s, TTFT, queue, KV usage and prefix-cache hit rate from the
server's event stream, the served model's status, and a log of finished requests."""

from __future__ import annotations

import time

from textual import work
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.widgets import DataTable, Label, Sparkline, Static

from localserve.tui.client import NoServerError, ServerError
from localserve.tui.common import ServerScreen, format_bytes
from localserve.tui.monitor_data import HISTORY, LOG_SIZE, Series

STATUS_SECONDS = 2.0

# panel id, title, MonitorData series, value format
PLOTS = [
    ("tok-s", "generated tok/s", "tok_s", "{:.1f}"),
    ("ttft", "TTFT ms (per request)", "ttft_ms", "{:.0f}"),
    ("queue", "queue peak (running + waiting)", "queue", "{:.0f}"),
    ("kv", "KV usage peak %", "kv_usage", "{:.1f}"),
    ("prefix", "prefix-cache hit %", "prefix_hit", "{:.1f}"),
]

LOG_COLUMNS = ("time", "request", "prompt", "cached", "output", "TTFT ms", "tok/s", "finish")


class Plot(Vertical):
    DEFAULT_CSS = """
    Plot { border: round $primary; height: 7; padding: 0 1; }
    Plot Sparkline { height: 3; }
    Plot .plot-value { text-style: bold; }
    """

    def __init__(self, title: str, fmt: str, **kw) -> None:
        super().__init__(**kw)
        self.border_title = title
        self.fmt = fmt

    def compose(self) -> ComposeResult:
        yield Label("-", classes="plot-value")
        yield Sparkline([], summary_function=max)

    def show(self, series: Series) -> None:
        last = series.last
        value = "-" if last is None else self.fmt.format(last)
        peak = f"   peak {self.fmt.format(series.peak())}" if series.values else ""
        self.query_one(Label).update(value + peak)
        # a fixed window, zeros before the first point: the x axis is time (or requests) and the
        # y axis starts at 0 rather than at the window's minimum
        self.query_one(Sparkline).data = [0.0] * (HISTORY - len(series.values)) + list(series.values)


def info_text(status: dict) -> str:
    if not status.get("models"):
        err = f": {status['load_error']}" if status.get("load_error") else ""
        return f"{status.get('model_ref', '')}: {status.get('status', '?')}{err}"
    m = status["models"][0]
    mem = m["memory"]
    return (f"[b]{m['name']}[/b]  {m['architecture']} on {m['backend']} ({m['device']})  ·  "
            f"context {m['context']}  ·  "
            f"weights ~{format_bytes(mem['weights_bytes'])}, KV pool {format_bytes(mem['kv_bytes'])}  ·  "
            f"limits {m['limits']['max_running']} running / {m['limits']['max_queued']} queued  ·  "
            f"server {status['version']}")


def totals_text(status: dict | None, stats: dict | None) -> str:
    lines = []
    if stats:
        kv = stats["kv"]
        lines.append(f"running {stats['running']}  waiting {stats['waiting']}  preempted {stats['preemptions']}")
        lines.append(f"KV pages {kv['pages_used']} used {kv['pages_cached']} cached /{kv['pages_total']}")
        lines.append(f"generated {stats['generated_tokens']} tokens")
        hit = f"prefix hit (lifetime) {100 * stats['prefix_hit_rate']:.1f}%"
        if stats.get("spec_acceptance") is not None:
            hit += f"  spec accept {100 * stats['spec_acceptance']:.0f}%"
        lines.append(hit)
    if status:
        f = status["requests"]["finished"]
        line = f"requests {f.get('finished', 0)} ok, {f.get('aborted', 0)} aborted, {f.get('error', 0)} failed"
        if f.get("overloaded"):
            line += f", {f['overloaded']} refused"
        lines.append(line)
    return "\n".join(lines) or "waiting for the server's stats..."


class MonitorScreen(ServerScreen):
    DEFAULT_CSS = """
    MonitorScreen #server-info { height: auto; padding: 0 1; }
    MonitorScreen #plots { grid-size: 3 2; grid-gutter: 0 1; height: 14; padding: 0 1; }
    MonitorScreen #totals { border: round $primary; height: 7; padding: 0 1; }
    MonitorScreen #request-log { height: 1fr; margin: 0 1; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.status: dict | None = None
        self._logged = 0

    def body(self) -> ComposeResult:
        yield Static("connecting...", id="server-info")
        with Grid(id="plots"):
            for pid, title, _, fmt in PLOTS:
                yield Plot(title, fmt, id=f"plot-{pid}")
            totals = Static("waiting for the server's stats...", id="totals")
            totals.border_title = "engine"
            yield totals
        yield DataTable(id="request-log", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one("#request-log", DataTable)
        for title in LOG_COLUMNS:
            table.add_column(title, key=title)
        self.status_timer = self.set_interval(STATUS_SECONDS, self.fetch_status)

    async def reload(self) -> None:
        self.fetch_status()
        self.on_data()

    @work(exclusive=True, group="status")
    async def fetch_status(self) -> None:
        if not self.is_current:
            return
        try:
            self.status = await self.app.client.status()
        except (NoServerError, ServerError) as exc:
            self.query_one("#server-info", Static).update(f"[red]{exc}[/red]")
            return
        self.query_one("#server-info", Static).update(info_text(self.status))
        self.query_one("#totals", Static).update(totals_text(self.status, self.app.data.last_stats))

    def on_data(self) -> None:
        data = self.app.data
        for pid, _, series, _ in PLOTS:
            self.query_one(f"#plot-{pid}", Plot).show(getattr(data, series))
        self.query_one("#totals", Static).update(totals_text(self.status, data.last_stats))
        self._log_requests()

    def _log_requests(self) -> None:
        data, table = self.app.data, self.query_one("#request-log", DataTable)
        new = min(data.num_requests - self._logged, len(data.requests))
        self._logged = data.num_requests
        if new <= 0:
            return
        for r in list(data.requests)[-new:]:
            table.add_row(*log_cells(r))
        while table.row_count > LOG_SIZE:
            table.remove_row(table.coordinate_to_cell_key((0, 0)).row_key)
        table.move_cursor(row=table.row_count - 1)  # follow the newest


def log_cells(r: dict) -> tuple[str, ...]:
    ttft = f"{1000 * r['ttft']:.0f}" if r.get("ttft") is not None else "-"
    reasons = ",".join(sorted(set(r.get("finish_reasons") or [r.get("finish_reason", "?")])))
    if r.get("status") not in (None, "finished"):
        reasons = f"{r['status']} ({reasons})"
    return (time.strftime("%H:%M:%S", time.localtime(r.get("time", 0))), r.get("request_id", "")[:8],
            str(r["prompt_tokens"]), str(r.get("cached_tokens", 0)), str(r["output_tokens"]), ttft,
            f"{r.get('tok_s', 0):.1f}", reasons)
