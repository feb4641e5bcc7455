"""deliver_email: render and send one recorded email (queue ``emails``)."""

from __future__ import annotations

from typing import Any

import dramatiq

from models.messages import DeliverEmail, parse_message
from workers.email.delivery import deliver
from workers.redis_dispatch import enqueue_many
from workers.retry_policy import actor_options, honour_retry_after


@dramatiq.actor(
    actor_name=DeliverEmail.actor_name,
    queue_name=DeliverEmail.queue_name,
    **actor_options(DeliverEmail.actor_name),
)
def deliver_email(payload: dict[str, Any]) -> None:
    """Send the delivery unless it is already sent; provider 429s wait for the reset."""
    message = parse_message(DeliverEmail, payload)
    with honour_retry_after():
        deliver(message.delivery_id)


def enqueue_deliveries(delivery_ids: list[int]) -> None:
    """One deliver_email message per delivery, in one round trip (call after the commit)."""
    if len(delivery_ids) == 1:
        deliver_email.send(DeliverEmail(delivery_id=delivery_ids[0]).to_payload())
        return
    enqueue_many(
        deliver_email.broker,
        [
            deliver_email.message(DeliverEmail(delivery_id=delivery_id).to_payload())
            for delivery_id in delivery_ids
        ],
    )
