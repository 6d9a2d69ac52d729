"""Terminal output for the demo: numbered sections, indented lines, and one live progress line.

On a terminal the progress line is rewritten in place; elsewhere (a log file, a test) it is printed
at most once a second, so the output stays readable either way.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO


class DemoError(Exception):
    """A failure the user can act on; its message says what to do."""


class Console:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self._last_progress = 0.0
        self._progress_since: float | None = None
        self._progress_shown = False

    def say(self, text: str = "") -> None:
        self._end_progress()
        print(text, file=self.stream, flush=True)

    def section(self, number: int, total: int, title: str) -> None:
        self.say()
        self.say(f"[{number}/{total}] {title}")

    def item(self, text: str) -> None:
        self.say(f"  {text}")

    def progress(self, text: str) -> None:
        """Show ``text`` as the current state of a long step (rewritten in place on a terminal)."""
        now = time.monotonic()
        if self._progress_since is None:
            self._progress_since = now
        if self.live:
            if now - self._last_progress >= 0.1:
                self.stream.write(f"\r\033[K  {text}")
                self.stream.flush()
                self._last_progress = now
                self._progress_shown = True
        elif now - max(self._last_progress, self._progress_since) >= 1.0:
            # Off a terminal: a line a second while the step lasts, nothing for a quick one.
            print(f"  {text}", file=self.stream, flush=True)
            self._last_progress = now

    def _end_progress(self) -> None:
        """The next line replaces the progress line on a terminal."""
        if self._progress_shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._progress_shown = False
        self._last_progress = 0.0
        self._progress_since = None


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it (shorter to read and copy)."""
    try:
        return os.path.relpath(path) if path.is_absolute() and path.resolve().is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)
