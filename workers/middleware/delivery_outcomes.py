"""Keep each email's status true when its message dies."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

from workers.dead_letters import fail_deliveries
from workers.retry_policy import underlying

logger = logging.getLogger(__name__)


class DeliveryOutcomes(dramatiq.Middleware):
    """When a deliver_email(_group) message fails for good, its deliveries become ``failed``.

    ``after_nack`` runs once the message is dead-lettered, whatever the reason:
    a permanent error, retries exhausted or an age limit.
    """

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        exception = underlying(getattr(message, "_exception", None))
        try:
            fail_deliveries(
                message.actor_name,
                message.args[0] if message.args else None,
                exception_type=type(exception).__name__ if exception is not None else None,
                reason=f"{type(exception).__name__}: {exception}" if exception else "dead-lettered",
            )
        except Exception:
            # The database is down: the dead letter's reason waits in Redis, and
            # filing it later fails these deliveries (workers.dead_letters.sync).
            logger.exception("Could not mark the deliveries of message %s as failed.", message.message_id)
