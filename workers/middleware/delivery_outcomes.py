"""Keep each email's status true when its message dies."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

from models.delivery import EmailDelivery, record_attempt_error
from models.errors import DeliveryGroupMismatch, UnknownDelivery
from models.messages import delivery_ids_of
from models.types import utc_now
from workers.database import session_scope
from workers.ops.metrics import count_email

logger = logging.getLogger(__name__)


class DeliveryOutcomes(dramatiq.Middleware):
    """When a deliver_email(_group) message fails for good, its deliveries become ``failed``.

    ``after_nack`` runs once the message is dead-lettered, whatever the reason:
    a permanent error, retries exhausted or an age limit.
    """

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        delivery_ids = delivery_ids_of(message.actor_name, message.args[0] if message.args else None)
        if not delivery_ids:
            return
        exception = getattr(message, "_exception", None)
        if isinstance(exception, UnknownDelivery | DeliveryGroupMismatch):
            # The message named the wrong deliveries: they are not its to fail.
            return
        reason = f"{type(exception).__name__}: {exception}" if exception is not None else "dead-lettered"
        failed: dict[str, int] = {}
        try:
            with session_scope() as session:
                now = utc_now()
                for delivery_id in delivery_ids:
                    if record_attempt_error(session, delivery_id, error=reason, now=now, permanent=True):
                        delivery = session.get(EmailDelivery, delivery_id)
                        if delivery is not None:
                            failed[delivery.kind] = failed.get(delivery.kind, 0) + 1
        except Exception:
            logger.exception("Could not mark deliveries %s as failed.", delivery_ids)
            return
        # Only those this made failed: a permanent error already did and was counted then.
        for kind, amount in failed.items():
            count_email(kind, "failed", amount)
