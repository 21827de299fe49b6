"""A one-line progress bar on stderr for long loops (embedding a folder, encoding label prompts)."""
from __future__ import annotations

import sys
import time

from .. import progress
from .terminal import say

REDRAW_S = 0.1     # at most ten redraws a second: drawing is I/O on every batch otherwise


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal, so that logs
    and pipes get no carriage returns, and not when TINYCLIP_PROGRESS=0 (tinyclip.progress.enabled)."""

    WIDTH = 30

    def __init__(self, total: int, what: str, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = progress.enabled(self.stream)
        self.total, self.what = total, what
        self.done = self.skipped = 0
        self.start = self.last_draw = time.monotonic()
        self.drawn = False
        if self.enabled:
            self._draw()

    def update(self, done: int, skipped: int = 0) -> None:
        self.done, self.skipped = done, skipped
        now = time.monotonic()
        if self.enabled and (now - self.last_draw >= REDRAW_S or done >= self.total):
            self.last_draw = now
            self._draw()

    def note(self, message: str) -> None:
        """Print a line (a warning) above the bar."""
        if self.drawn:
            self.stream.write("\r\033[K")
        say(message, file=self.stream)
        if self.enabled:
            self._draw()

    def close(self) -> None:
        if self.drawn:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def _draw(self) -> None:
        total = max(self.total, self.done, 1)
        filled = int(self.WIDTH * self.done / total)
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", {duration((total - self.done) / rate)} left" if rate > 0 and self.done < total else ""
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        self.stream.write(f"\r\033[K{self.what} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                          f"{self.done}/{total} ({rate:.1f}/s{eta}{skipped})")
        self.stream.flush()
        self.drawn = True


def duration(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
