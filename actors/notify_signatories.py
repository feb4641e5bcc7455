"""notify_signatories: the client signed; check the sections, tell every signatory."""

from __future__ import annotations

from typing import Any

import dramatiq

from actors.deliver_email import enqueue_deliveries
from models.errors import Rejected
from models.messages import NotifySignatories, contract_id_of, parse_message
from models.signing import record_signature, record_signature_rejection
from models.types import utc_now
from workers.database import session_scope
from workers.retry_policy import actor_options, honour_retry_after


@dramatiq.actor(
    actor_name=NotifySignatories.actor_name,
    queue_name=NotifySignatories.queue_name,
    **actor_options(NotifySignatories.actor_name),
)
def notify_signatories(payload: dict[str, Any]) -> None:
    """Public message; see ``models.messages.NotifySignatories`` for its fields."""
    try:
        message = parse_message(NotifySignatories, payload)
        with honour_retry_after(), session_scope() as session:
            delivery_ids = record_signature(session, message, now=utc_now())
    except Rejected as rejection:
        contract_id = contract_id_of(payload)
        if contract_id is not None:
            with session_scope() as session:
                record_signature_rejection(session, contract_id, rejection, now=utc_now())
        raise
    enqueue_deliveries(delivery_ids, in_one_request=True)
