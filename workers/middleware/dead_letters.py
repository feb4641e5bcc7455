"""Record why a message died, in SQL, the moment Dramatiq dead-letters it."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.common import current_millis

from models.types import utc_now
from workers import dead_letters

logger = logging.getLogger(__name__)


class DeadLetters(dramatiq.Middleware):
    """Counts attempts across retries and files each dead message with its reason.

    Placed after ``Retries`` in the middleware list so that its
    ``after_process_message`` runs first (Dramatiq calls "after" hooks in
    reverse order): the counters it sets travel in the retried copy.
    """

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if exception is None:
            return
        options = message.options
        options[dead_letters.ATTEMPTS_OPTION] = int(options.get(dead_letters.ATTEMPTS_OPTION) or 0) + 1
        options.setdefault(dead_letters.FIRST_FAILED_OPTION, current_millis())

    def before_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        # The nack moves the message to its dead-letter queue and only then does
        # after_nack file the reason: a worker killed in between would leave the
        # message there with its reason unknown. Held in Redis from now, the reason
        # outlives the worker, and sync files it.
        try:
            # Kept on the message (as Dramatiq keeps its exception): after_nack files the same.
            message._dead_letter_fields = self._fields(message)
            dead_letters.hold(broker, message._dead_letter_fields)
        except Exception:
            logger.exception("Could not hold the reason of dying message %s.", message.message_id)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        try:
            fields = getattr(message, "_dead_letter_fields", None) or self._fields(message)
            dead_letters.record(broker, fields)
            dead_letters.release(broker, message.message_id)
        except Exception:
            # Never let the record break the worker: the message itself is safe
            # in the dead-letter queue, its reason held, and sync files it later.
            logger.exception("Could not record dead message %s.", message.message_id)

    @staticmethod
    def _fields(message: Any) -> dict[str, Any]:
        return dead_letters.describe(message, getattr(message, "_exception", None), now=utc_now())
