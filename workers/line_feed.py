"""An input's lines as they arrive, each waited for no longer than the caller says.

``send-contracts`` reads a file or a pipe. From a file every line is there at
once; from a pipe a producer may write a line now and the next one in a minute,
and a reader that blocks on the next line (Python's line iteration) holds the
lines it has until the producer writes again or closes the pipe. This one polls
the input's descriptor, so its caller can send what it has when the input pauses.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from typing import BinaryIO

#: Bytes read from the input at a time.
READ_SIZE = 64 * 1024


class LineFeed:
    """The lines of a binary input, numbered from 1, never holding more of it than one read
    beyond a line of ``max_line_bytes``.

    A longer line is not kept: its bytes are dropped as they arrive and it is
    given as None, so that an input with no newline (a binary file given by
    mistake) does not fill the memory. An input with no descriptor (an in-memory
    stream) always has its next line ready: it is read with ``readline`` and no
    timeout applies.
    """

    def __init__(self, stream: BinaryIO, *, max_line_bytes: int) -> None:
        self._stream = stream
        #: The longest line kept, in bytes (its newline included).
        self.max_line_bytes = max_line_bytes
        self._poll: select.poll | None = None
        try:
            descriptor = stream.fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation is both
            descriptor = -1
        if descriptor >= 0:
            # poll, not epoll: epoll refuses regular files, which poll reports always readable.
            self._poll = select.poll()
            self._poll.register(descriptor, select.POLLIN)
        self._descriptor = descriptor
        self._partial = bytearray()
        #: Whether the line being read is already too long (its bytes are dropped).
        self._overlong = False
        self._lines: deque[bytes | None] = deque()
        self._number = 0
        #: Whether the input has ended (every line may not have been taken yet).
        self.ended = False

    def next_line(self, *, timeout: float | None) -> tuple[int, bytes | None] | None:
        """The next line's number and bytes (newline included, if it had one; None if too long).

        None at the end of the input (``ended``), or when ``timeout`` seconds
        passed without a whole line arriving (``timeout=None``: wait as long as
        it takes; 0: only a line already arrived).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._lines:
            if self.ended:
                return None
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._read(remaining):
                return None
        self._number += 1
        return self._number, self._lines.popleft()

    def _read(self, timeout: float | None) -> bool:
        """Read what has arrived into whole lines; False when nothing arrived within ``timeout``."""
        if self._poll is None:
            chunk = self._stream.readline(READ_SIZE)
        else:
            if not self._poll.poll(None if timeout is None else timeout * 1000):
                return False
            chunk = os.read(self._descriptor, READ_SIZE)
        if not chunk:
            self.ended = True
            if self._partial or self._overlong:
                # A last line without its newline.
                self._end_line(b"")
            return True
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._end_line(chunk[start : end + 1])
            start = end + 1
        self._add(chunk[start:])
        return True

    def _add(self, piece: bytes) -> None:
        """Keep ``piece`` of the line being read, unless that line is too long."""
        if self._overlong:
            return
        self._partial += piece
        if len(self._partial) > self.max_line_bytes:
            self._overlong = True
            self._partial.clear()

    def _end_line(self, last_piece: bytes) -> None:
        self._add(last_piece)
        self._lines.append(None if self._overlong else bytes(self._partial))
        self._partial.clear()
        self._overlong = False
