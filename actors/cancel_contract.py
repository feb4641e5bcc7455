"""cancel_contract: stop a contract's reminders and the emails it has not sent yet."""

from __future__ import annotations

from typing import Any

import dramatiq

from models.cancelling import record_cancellation
from models.messages import CancelContract, parse_message
from models.types import utc_now
from workers.database import session_scope
from workers.ops.metrics import count_email
from workers.retry_policy import actor_options


@dramatiq.actor(
    actor_name=CancelContract.actor_name,
    queue_name=CancelContract.queue_name,
    **actor_options(CancelContract.actor_name),
)
def cancel_contract(payload: dict[str, Any]) -> None:
    """Public message; see ``models.messages.CancelContract`` for its fields."""
    message = parse_message(CancelContract, payload)
    with session_scope() as session:
        cancelled = record_cancellation(session, message, now=utc_now())
    # After commit: only emails that really stay unsent are counted.
    for kind in cancelled:
        count_email(kind, "cancelled")
