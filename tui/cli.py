"""`localserve tui`: the terminal UI over a local or remote server."""

from __future__ import annotations

import argparse
import shlex

from localserve import envs


def add_tui_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tui",
        help="terminal UI: models, pull, quantize, live monitor",
        description="A Textual terminal UI over a localserve server's HTTP API: the model store (list, "
        "details, delete), pull and quantize with live progress, and a live monitor of the engine. "
        "When nothing answers at a local --url it offers to start `localserve up` (stopped again on exit).",
    )
    p.add_argument("--url", default=None,
                   help="the server (default: $LOCALSERVE_URL, else http://127.0.0.1:$LOCALSERVE_PORT or :8000)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: the first of $LOCALSERVE_API_KEY)")
    p.add_argument("--model", default=None, help="MODEL for a server the TUI starts (default: the embedded default)")
    p.add_argument("--up-args", default="", help="more `localserve up` flags for a server the TUI starts, "
                   "e.g. \"--threads 2 --ctx 4096\"")
    p.set_defaults(func=run_tui)


def default_url() -> str:
    return envs.URL.get() or f"http://127.0.0.1:{envs.PORT.get()}"


def run_tui(args: argparse.Namespace) -> int:
    from localserve.tui.app import LocalServeApp

    key = args.api_key or next(iter(envs.API_KEY.get()), None)
    up_args = ([args.model] if args.model else []) + shlex.split(args.up_args)
    if key and "--api-key" not in up_args:
        up_args += ["--api-key", key]
    LocalServeApp(args.url or default_url(), api_key=key, up_args=up_args).run()
    return 0
