"""deliver_email and deliver_email_group: render and send recorded emails (queue ``emails``)."""

from __future__ import annotations

from typing import Any

import dramatiq

from models.messages import DeliverEmail, DeliverEmailGroup, parse_message
from workers.email.delivery import deliver
from workers.email.group_delivery import deliver_group
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


@dramatiq.actor(
    actor_name=DeliverEmailGroup.actor_name,
    queue_name=DeliverEmailGroup.queue_name,
    # The same emails as deliver_email, so the same retry policy (DELIVER_EMAIL_*).
    **actor_options(DeliverEmail.actor_name),
)
def deliver_email_group(payload: dict[str, Any]) -> None:
    """Send one event's deliveries in one provider request; a refused request goes one by one."""
    message = parse_message(DeliverEmailGroup, payload)
    with honour_retry_after():
        outcome = deliver_group(message.delivery_ids)
    if outcome.one_by_one:
        enqueue_deliveries(outcome.one_by_one)


def enqueue_deliveries(delivery_ids: list[int], *, in_one_request: bool = False) -> None:
    """Enqueue the deliveries' messages in one round trip (call after the commit).

    ``in_one_request``: the emails of one event (a contract's signed
    notifications) go as one deliver_email_group message, sent as one request.
    """
    if not delivery_ids:
        return
    if in_one_request and len(delivery_ids) > 1:
        deliver_email_group.send(DeliverEmailGroup(delivery_ids=delivery_ids).to_payload())
        return
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
