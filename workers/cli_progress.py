"""The progress line of long commands, on stderr.

On a terminal it is rewritten in place, and cleared before any other line is
written so that a refusal never lands after it on the same line; elsewhere (a
log file, CI) it is a plain line at most every ``PROGRESS_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import time
from typing import TextIO

#: Off a terminal, a progress line at most this often, in seconds.
PROGRESS_INTERVAL_SECONDS = 5.0

#: Carriage return, then erase to the end of the line (ANSI): the line is blank again.
_CLEAR_LINE = "\r\x1b[K"


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self, stream: TextIO, *, interval: float = PROGRESS_INTERVAL_SECONDS) -> None:
        self.stream = stream
        self.terminal = stream.isatty()
        self.interval = interval
        self.last = time.monotonic()
        self.shown = False

    def update(self, text: str) -> None:
        """Show ``text`` as the current progress."""
        if self.terminal:
            self.stream.write(f"{_CLEAR_LINE}{text}")
            self.stream.flush()
            self.shown = True
        elif time.monotonic() - self.last >= self.interval:
            self.stream.write(f"{text}\n")
            self.stream.flush()
            self.last = time.monotonic()

    def write(self, line: str) -> None:
        """Write one whole line of other output (a refusal) without mixing it into the progress."""
        self.clear()
        self.stream.write(f"{line}\n")

    def clear(self) -> None:
        """Erase the progress line on a terminal (the summary or an error follows)."""
        if self.shown:
            self.stream.write(_CLEAR_LINE)
            self.stream.flush()
            self.shown = False

    def finish(self) -> None:
        """Done: the caller prints the summary itself, once."""
        self.clear()
