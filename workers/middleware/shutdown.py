"""One stop request, one graceful stop.

A platform that stops a service by signalling its whole process group (Heroku,
systemd's default ``KillMode=control-group``, ``kill -TERM -PGID``) reaches each
worker process twice: directly, and again a moment later when Dramatiq's main
process forwards the signal. Dramatiq takes a second SIGTERM as "stop now" and
exits at once with code 1, abandoning the messages in flight: a send the
provider accepted is then never recorded, and is sent again once its lease ends.
Here a SIGTERM that follows the first within a moment is the same request and
is dropped; a later one still forces the stop.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import dramatiq

#: A second SIGTERM this soon after the first is the same stop request, in seconds.
DUPLICATE_SIGNAL_WINDOW_SECONDS = 2.0


class SingleStopSignal(dramatiq.Middleware):
    """Wraps the worker process's SIGTERM handler so a duplicated signal stays graceful."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        # Dramatiq installs its handler in the worker process before booting
        # the broker; signal handlers can only change in the main thread.
        if threading.current_thread() is not threading.main_thread():
            return
        dramatiq_handler = signal.getsignal(signal.SIGTERM)
        if not callable(dramatiq_handler):
            return
        first_at: list[float] = []

        def handler(signum: int, frame: FrameType | None) -> Any:
            now = self.clock()
            if first_at and now - first_at[0] < DUPLICATE_SIGNAL_WINDOW_SECONDS:
                return None
            first_at[:] = first_at or [now]
            return dramatiq_handler(signum, frame)

        signal.signal(signal.SIGTERM, handler)
