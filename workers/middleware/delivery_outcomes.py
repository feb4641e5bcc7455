"""Keep each email's status true when its message dies."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

from models.delivery import EmailDelivery, record_attempt_error
from models.types import utc_now
from workers.database import session_scope
from workers.ops.metrics import count_email

logger = logging.getLogger(__name__)


class DeliveryOutcomes(dramatiq.Middleware):
    """When a deliver_email message fails for good, its delivery becomes ``failed``.

    ``after_nack`` runs once the message is dead-lettered, whatever the reason:
    a permanent error, retries exhausted or an age limit.
    """

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.actor_name != "deliver_email" or not message.args:
            return
        payload = message.args[0]
        delivery_id = payload.get("delivery_id") if isinstance(payload, dict) else None
        if not isinstance(delivery_id, int):
            return
        exception = getattr(message, "_exception", None)
        reason = f"{type(exception).__name__}: {exception}" if exception is not None else "dead-lettered"
        try:
            with session_scope() as session:
                failed = record_attempt_error(
                    session, delivery_id, error=reason, now=utc_now(), permanent=True
                )
                delivery = session.get(EmailDelivery, delivery_id) if failed else None
                kind = delivery.kind if delivery is not None else None
        except Exception:
            logger.exception("Could not mark delivery %s as failed.", delivery_id)
            return
        # Only when this made it failed: a permanent error already did and was counted then.
        if kind is not None:
            count_email(kind, "failed")
