"""deliver_email and deliver_email_group: render and send recorded emails (queue ``emails``)."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.common import compute_backoff, current_millis
from dramatiq.middleware import CurrentMessage
from dramatiq.middleware.retries import DEFAULT_MAX_BACKOFF

from models.errors import DeliveryBusy, TransientError
from models.messages import DeliverEmail, DeliverEmailGroup, parse_message
from models.types import utc_now
from workers import dead_letters
from workers.broker_errors import BROKER_ERRORS, broker_problem
from workers.dead_letters import ATTEMPTS_OPTION, FIRST_FAILED_OPTION
from workers.email.delivery import Prepared, deliver, recorded_failure, send_prepared
from workers.email.group_delivery import deliver_group
from workers.redis_dispatch import enqueue_many
from workers.retry_policy import actor_options, honour_retry_after

logger = logging.getLogger(__name__)

#: Message option: the delivery failed for good on its first attempt, made by the
#: send_contract that recorded it; this message files its dead letter.
FAILED_OPTION = "first_attempt_failed"


@dramatiq.actor(
    actor_name=DeliverEmail.actor_name,
    queue_name=DeliverEmail.queue_name,
    **actor_options(DeliverEmail.actor_name),
)
def deliver_email(payload: dict[str, Any]) -> None:
    """Send the delivery unless it is already sent; provider 429s wait for the reset."""
    message = parse_message(DeliverEmail, payload)
    current = CurrentMessage.get_current_message()
    if current is not None and current.options.get(FAILED_OPTION):
        # Failed for good on its first attempt (deliver_or_hand_over): die of that error.
        failure = recorded_failure(message.delivery_id)
        if failure is not None:
            raise failure
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


def deliver_or_hand_over(delivery_ids: list[int], *, prepared: Prepared | None) -> None:
    """Send a lone prepared delivery in this thread (call after the commit); if it does
    not go out, deliver_email takes it over. Otherwise enqueue, as ``enqueue_deliveries``.

    ``prepared``: the delivery's claim, made in the transaction just committed
    (``workers.email.delivery.prepare``, or ``prepare_invitation`` for the
    invitation recorded already claimed).

    A contract's invitation is sent by the send_contract that records it: a second
    message (its trip through the broker, fetch, ack and middleware) cost about as
    much worker CPU as the rest of the email. The attempt counts as deliver_email's
    first, so the email's retry policy, logs and dead letter are deliver_email's as
    when it was queued at once: after a failure deliver_email would retry, the
    message that takes over carries ``retries=1`` and runs when deliver_email's first
    retry would have (at the provider's reset after a 429); after one it would not
    (a permanent error, or no retry allowed), the delivery is failed and the message
    only files the dead letter, without asking the provider again. A delivery
    another attempt is sending (``DeliveryBusy``, a duplicate message) is no
    failure: the message that checks it after that attempt's lease carries no retry.
    """
    if prepared is None or delivery_ids != [prepared.delivery_id]:
        enqueue_deliveries(delivery_ids)
        return
    delivery_id = prepared.delivery_id
    # deliver_email's own predicate (its options, from settings when declared): a
    # failure it would not retry fails the delivery at once.
    will_retry = deliver_email.options["retry_when"]
    try:
        send_prepared(prepared, retried=lambda exc: will_retry(0, exc))
    except Exception as exc:
        payload = DeliverEmail(delivery_id=delivery_id).to_payload()
        if not will_retry(0, exc):
            logger.warning(
                "Delivery %d failed for good (%s); deliver_email files its dead letter.",
                delivery_id,
                type(exc).__name__,
            )
            _file_failed(payload, exc)
            return
        delay = first_retry_delay_ms(exc)
        if isinstance(exc, DeliveryBusy):
            # No failure: a duplicate message met the email its twin is sending now.
            # The later check finds it sent, or takes over if the twin died; it is
            # no retry, so it starts with deliver_email's whole retry budget and
            # counts no attempt in a dead letter (this call made none).
            logger.info(
                "Delivery %d is being sent by another attempt; deliver_email checks it in %d ms.",
                delivery_id,
                delay,
            )
            deliver_email.send_with_options(args=(payload,), delay=delay)
            return
        logger.warning(
            "Delivery %d: first attempt failed (%s); deliver_email retries it in %d ms.",
            delivery_id,
            type(exc).__name__,
            delay,
        )
        failed_at: Any = {ATTEMPTS_OPTION: 1, FIRST_FAILED_OPTION: current_millis()}
        deliver_email.send_with_options(args=(payload,), delay=delay, retries=1, **failed_at)


def _file_failed(payload: dict[str, Any], exc: Exception) -> None:
    """Enqueue the message that files a failed first attempt's dead letter.

    When the broker cannot take it, the dead letter is filed here, in SQL, where
    operators list and retry dead letters: the delivery is already failed, so a
    redelivered send_contract would find nothing left to send, and the failure
    would otherwise be recorded nowhere but on the email.
    """
    # The attempt is counted when the message dies (DeadLetters), not twice.
    failed: Any = {FAILED_OPTION: True}
    message = deliver_email.message_with_options(args=(payload,), **failed)
    try:
        deliver_email.broker.enqueue(message)
    except BROKER_ERRORS as broker_error:
        logger.error(
            "The message broker %s: the dead letter of message %s is filed without its broker copy.",
            broker_problem(broker_error),
            message.message_id,
        )
        dead_letters.record(deliver_email.broker, dead_letters.describe(message, exc, now=utc_now()))


def first_retry_delay_ms(exc: Exception) -> int:
    """When deliver_email's Retries middleware would retry after this failure, in milliseconds."""
    if isinstance(exc, TransientError) and exc.retry_after_ms is not None:
        return exc.retry_after_ms
    options = deliver_email.options
    _, delay = compute_backoff(
        0, factor=options["min_backoff"], max_backoff=min(options["max_backoff"], DEFAULT_MAX_BACKOFF)
    )
    return delay
