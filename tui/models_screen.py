"""Models: the store as a sortable table, the highlighted model's details, delete with confirmation."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Static

from localserve.tui.client import NoServerError, ServerError
from localserve.tui.common import ServerScreen, format_bytes, format_params
from localserve.tui.dialogs import ConfirmScreen

# column key, title, the row field it sorts by
COLUMNS = [
    ("name", "Name", "name"),
    ("size", "Size", "size"),
    ("quant", "Quant", "quantization"),
    ("arch", "Arch", "architecture"),
    ("params", "Params", "parameters"),
    ("ctx", "Ctx", "context"),
    ("modified", "Modified", "modified"),
]


def cells(m: dict) -> list[str]:
    mark = " *" if m.get("served") else ""
    return [m["name"] + mark, format_bytes(m["size"]), m["quantization"] or "-", m["architecture"] or "-",
            format_params(m["parameters"]), str(m["context"] or "-"), (m["modified"] or "")[:10]]


def details_text(d: dict) -> str:
    lines = [
        f"[b]{d['name']}[/b]" + ("  (embedded default)" if d.get("default") else "")
        + ("  (served now)" if d.get("served") else ""),
        "",
        f"format        {d['format']}",
        f"architecture  {d['architecture']}",
        f"parameters    {format_params(d['parameters'])}",
        f"quantization  {d['quantization']}",
        f"context       {d['context']}",
        f"layers        {d.get('num_layers', '-')}   hidden {d.get('hidden_size', '-')}",
        f"heads         {d.get('num_heads', '-')} q / {d.get('num_kv_heads', '-')} kv, "
        f"head_dim {d.get('head_dim', '-')}",
        f"vocabulary    {d.get('vocab_size', '-')}",
        f"on disk       {format_bytes(d['size'])}",
        f"source        {d.get('source', '')}",
    ]
    if d.get("quantized_from"):
        lines.append(f"quantized from {d['quantized_from']}")
    if "weights_memory_bytes" in d:
        lines += [
            "",
            f"memory @ ctx {d['ctx']}",
            f"  weights     {format_bytes(d['weights_memory_bytes'])}",
            f"  KV cache    {format_bytes(d['kv_bytes'])}",
            f"  fits        {'yes' if d['fits'] else 'no: try a smaller context'}",
        ]
    types = d.get("tensor_types") or {}
    if types:
        lines += ["", "tensors       " + ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))]
    return "\n".join(lines)


class ModelsScreen(ServerScreen):
    DEFAULT_CSS = """
    ModelsScreen #models-body { height: 1fr; }
    ModelsScreen #models-table { width: 1fr; height: 1fr; }
    ModelsScreen #details { width: 42; height: 1fr; border-left: solid $primary; padding: 0 1; }
    ModelsScreen #models-status { height: 1; padding: 0 1; }
    """
    BINDINGS = [
        Binding("d,delete", "delete", "Delete"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("r", "reload", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.sort_key, self.sort_reverse = "name", False

    def body(self) -> ComposeResult:
        yield Static("", id="models-status", classes="muted")
        with Horizontal(id="models-body"):
            yield DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="details"):
                yield Static("", id="details-text")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, title, _ in COLUMNS:
            table.add_column(title, key=key)

    async def reload(self) -> None:
        try:
            self.rows = await self.app.client.models()
        except (NoServerError, ServerError) as exc:
            self.query_one("#models-status", Static).update(str(exc))
            return
        self.populate()

    async def action_reload(self) -> None:
        await self.reload()

    def populate(self) -> None:
        table = self.query_one(DataTable)
        current = self.selected_name
        field = dict((k, f) for k, _, f in COLUMNS)[self.sort_key]
        numeric = field in ("size", "parameters", "context")
        rows = sorted(self.rows, key=lambda m: m[field] or 0 if numeric else str(m[field] or ""),
                      reverse=self.sort_reverse)
        table.clear()
        for m in rows:
            table.add_row(*cells(m), key=m["name"])
        if current is not None and current in {m["name"] for m in rows}:
            table.move_cursor(row=table.get_row_index(current))
        total = sum(m["size"] for m in rows)
        arrow = "v" if self.sort_reverse else "^"
        self.query_one("#models-status", Static).update(
            f"{len(rows)} models, {format_bytes(total)}  ·  sorted by {self.sort_key} {arrow}  ·  * = served now")
        if not rows:
            self.query_one("#details-text", Static).update("the store is empty: pull a model (F3)")

    @property
    def selected_name(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        row_key, _ = table.coordinate_to_cell_key((table.cursor_row, 0))
        return row_key.value

    @on(DataTable.HeaderSelected)
    def header_selected(self, event: DataTable.HeaderSelected) -> None:
        self.sort_by(event.column_key.value)

    def action_cycle_sort(self) -> None:
        keys = [k for k, _, _ in COLUMNS]
        self.sort_by(keys[(keys.index(self.sort_key) + 1) % len(keys)], toggle=False)

    def sort_by(self, key: str, toggle: bool = True) -> None:
        if toggle and key == self.sort_key:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_key, self.sort_reverse = key, key in ("size", "params", "modified")  # biggest, newest first
        self.populate()

    @on(DataTable.RowHighlighted)
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value:
            self.show_details(event.row_key.value)

    @work(exclusive=True, group="details")
    async def show_details(self, name: str) -> None:
        text = self.query_one("#details-text", Static)
        try:
            text.update(details_text(await self.app.client.model(name)))
        except (NoServerError, ServerError) as exc:
            text.update(f"[red]{exc}[/red]")

    def action_delete(self) -> None:
        name = self.selected_name
        if name is None:
            return

        async def answered(yes: bool | None) -> None:
            if yes:
                await self.delete(name)

        self.app.push_screen(ConfirmScreen(f"Delete {name} from the store?"), answered)

    async def delete(self, name: str) -> None:
        try:
            out = await self.app.client.delete_model(name)
        except (NoServerError, ServerError) as exc:
            self.notify(str(exc), title="not deleted", severity="error")
            return
        self.notify(f"deleted {out['deleted']} (freed {format_bytes(out['freed'])})", title="deleted")
        await self.reload()
