"""Starting `localserve up` for the TUI when no server answers on a local URL. The TUI stops
the server it started when it exits; a server it found running is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse


@dataclass
class ServerLauncher:
    url: str
    up_args: list[str] = field(default_factory=list)  # MODEL and flags for `localserve up`
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def command(self) -> list[str]:
        p = urlparse(self.url)
        host = p.hostname or "127.0.0.1"
        return [sys.executable, "-m", "localserve", "up", *self.up_args, "--host", host, "--port", str(p.port or 8000)]

    def start(self) -> None:
        self.stop()  # one we started before that no longer answers: replace it
        fd, name = tempfile.mkstemp(prefix="localserve-tui-up-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "w") as log:
            # its own session: Ctrl-C in the TUI's terminal is the TUI's, not the server's
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 8) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if not self.running:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
