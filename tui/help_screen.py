"""Help: the screens and their keys."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Markdown

from localserve.tui.common import ServerScreen

HELP = """\
# localserve tui

A terminal UI over a localserve server (`localserve up`), local or remote (`--url`). It talks to
the server's HTTP API only: the store routes for models, pulls and quantizations, `/api/status`
and the `/api/events` stream for monitoring.

| key | screen | |
|---|---|---|
| F1 | Help | this page |
| F2 | Models | the server's model store: sortable table, details, delete |
| F3 | Pull | download a model into the store: live progress, cancel |
| F4 | Quantize | convert a store model to another GGUF type: estimated size, progress, cancel |
| F5 | Monitor | live tok/s, TTFT, queue, KV usage, prefix-cache hit rate; finished requests |
| Ctrl+Q | | quit (a server the TUI started stops with it) |

**Models**: `s` cycles the sort column (or click a column header; again to reverse), `d` deletes
the highlighted model after a confirmation, `r` refreshes. `*` marks the model being served.
The embedded default model cannot be deleted.

**Pull**: a Hugging Face repo (`org/name`, `org/name:Q4_K_M`, `org/name:file.gguf`), an http(s)
URL or a path on the server's machine. `Escape` cancels a running pull; the store stays as it
was and a later pull of the same file resumes.

**Quantize**: GGUF sources convert to every type gguf-py writes (Q8_0, Q4_0, ...), Hugging Face
folders to F32, F16, BF16 or Q8_0. The estimated size updates as you choose. `Escape` cancels.

**Monitor**: one point per second for tok/s, queue, KV usage and the prefix-cache hit rate over
that second; TTFT is one point per finished request. The log lists finished requests with their
finish reasons (`stop`, `length`, `abort`).
"""


class HelpScreen(ServerScreen):
    DEFAULT_CSS = "HelpScreen VerticalScroll { padding: 0 2; }"

    def body(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)
