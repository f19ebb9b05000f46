"""The real coding-agent CLIs against a fresh `localserve up` (the embedded default model): each
client's two-turn drive from tests/clients (same installs, proxy, settings), then a Markdown table
for BENCHMARKS.md: requests per turn, prompt tokens per turn, turn 2's share served from the
prefix cache (the server's /metrics), and TTFT cold (turn 1) and warm (turn 2) at the proxy.

    .venv/bin/python benchmarks/scripts/agent_clients.py [--clients claude-code,codex,aider] [--keep DIR]
        [--home DIR]   # LOCALSERVE_HOME (default: a fresh temporary one)
        [--url URL]    # a server that is already up instead of a fresh one
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.clients.drivers import CLIENTS, SERVER_ARGS, drive, figures, markdown_table  # noqa: E402
from tests.clients.install import ensure_installed  # noqa: E402
from tests.clients.proxy import CapturingProxy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default=",".join(CLIENTS), help="comma list of " + ", ".join(CLIENTS))
    ap.add_argument("--keep", type=Path, help="keep captures, client homes and the server log here")
    ap.add_argument("--home", type=Path, help="LOCALSERVE_HOME for the server (default: a temporary one)")
    ap.add_argument("--url", help="drive a server that is already up (its prefix cache may be warm) instead")
    args = ap.parse_args()
    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    unknown = set(names) - set(CLIENTS)
    if unknown:
        ap.error(f"unknown client(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="agent_clients_") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        os.environ["LOCALSERVE_HOME"] = str(args.home or root / "localserve_home")
        exes = {n: ensure_installed(CLIENTS[n].spec) for n in names}  # before the server: no idle load
        from tests.server.conftest import Server, start_server

        server = Server(None, args.url.rstrip("/"), None) if args.url else start_server(SERVER_ARGS, root / "up.log")
        rows = []
        try:
            for name in names:
                folder = root / name
                folder.mkdir(parents=True, exist_ok=True)
                with CapturingProxy(server.url, log=folder / "capture.jsonl") as proxy:
                    client = CLIENTS[name](exes[name], folder / "home", folder / "work", proxy.url)
                    session = drive(client, proxy, server.url, server_log=server.log)
                row = figures(session)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
                if not row["ok"]:
                    print(session.report(), file=sys.stderr)
        finally:
            if server.proc is not None:
                server.stop()
        print(markdown_table(rows))
        return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
