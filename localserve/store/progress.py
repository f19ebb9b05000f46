"""A byte progress bar (done / total, rate, ETA) for pulls and conversions.

It takes tqdm's constructor keywords and `update(n)`, so huggingface_hub's downloader can
drive it through `tqdm_class`; `on_update(done, total)` lets other surfaces (a TUI, an
event stream) follow the same counts. On a terminal it redraws one line; elsewhere it
prints a line every 10%.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

ProgressCallback = Callable[[int, "int | None"], None]


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressBar:
    def __init__(
        self,
        total: int | None = None,
        initial: int = 0,
        desc: str = "",
        stream: TextIO | None = None,
        on_update: ProgressCallback | None = None,
        enabled: bool = True,
        unit: str = "B",
        **_tqdm_kwargs: object,  # unit_scale, name, ...: tqdm's, not needed here
    ) -> None:
        self.unit = unit
        self.total = total
        self.n = initial
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.on_update = on_update
        self.enabled = enabled
        self._start_n = initial
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self._drawn_n = -1  # the count of the last line drawn (a log needs no repeat of it)
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._tty and self._drawn_n >= 0:
            self.stream.write("\n")  # the error message goes below the bar, not over it

    def reset_total(self, total: int | None) -> None:
        self.total = total

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.on_update is not None:
            self.on_update(self.n, self.total)
        now = time.monotonic()
        if self._tty and now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw("\r")
        elif not self._tty and self.total:
            decile = int(10 * self.n / self.total)
            if decile != self._last_decile:
                self._last_decile = decile
                self._draw("")

    def close(self) -> None:
        if self._tty:
            self._draw("\r", end="\n")
        elif self._drawn_n != self.n:
            self._draw("")

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = (self.n - self._start_n) / elapsed
        parts = [self.desc] if self.desc else []
        if self.total:
            pct = 100.0 * self.n / self.total
            parts.append(f"{self._fmt(self.n)} / {self._fmt(self.total)} {pct:5.1f}%")
        else:
            parts.append(self._fmt(self.n))
        parts.append(f"{self._fmt(rate)}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
        elif self.total and self.n >= self.total:
            parts.append(f"in {format_seconds(elapsed)}")
        return "  ".join(parts)

    def _fmt(self, n: float) -> str:
        if self.unit == "B":
            return format_bytes(n)
        for suffix in ("", "k", "M", "G"):
            if abs(n) < 1000 or suffix == "G":
                return f"{n:.1f}{suffix} {self.unit}"
            n /= 1000
        raise AssertionError

    def _draw(self, prefix: str, end: str = "") -> None:
        if not self.enabled:
            return
        self._drawn_n = self.n
        text = self.line()
        if self._tty:
            self.stream.write(f"{prefix}{text:<79}{end}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
