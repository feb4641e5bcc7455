"""send_contract: validate, bind, issue codes, record, then send the invitation (or hand it over)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import dramatiq

from actors.deliver_email import deliver_or_hand_over
from models.access_codes import CodeSource, with_access_code
from models.errors import Rejected
from models.messages import SendContract, contract_id_of, parse_message
from models.sending import record_contract, record_send_rejection
from models.types import utc_now
from workers.database import session_scope, transactions_lock_rows
from workers.email.delivery import Prepared, prepare, prepare_invitation
from workers.retry_policy import actor_options
from workers.settings import Settings, get_settings


@dramatiq.actor(
    actor_name=SendContract.actor_name,
    queue_name=SendContract.queue_name,
    **actor_options(SendContract.actor_name),
)
def send_contract(payload: dict[str, Any]) -> None:
    """Public message; see ``models.messages.SendContract`` for its fields."""
    message: SendContract | None = None
    try:
        message = parse_message(SendContract, payload)
        settings = get_settings()
        now = utc_now()
        parsed = message
        delivery_ids, first = with_access_code(
            lambda code: _record(parsed, settings=settings, now=now, access_code=code),
            policy=settings.access_code_policy(),
            now=now,
            hash_in_transaction=transactions_lock_rows(),
        )
    except Rejected as rejection:
        contract_id = message.contract_id if message else contract_id_of(payload)
        if contract_id is not None:
            with session_scope() as session:
                record_send_rejection(session, contract_id, rejection, message=message, now=utc_now())
        raise
    # After commit: the email is never sent before its delivery row exists.
    deliver_or_hand_over(delivery_ids, prepared=first)


#: ``send_contract_bulk``'s priority; send_contract's is Dramatiq's default, 0. A worker
#: runs the messages it has fetched lowest number first.
BULK_PRIORITY = 10

#: The same job for the bulk producers (``send_contracts``, ``send-contracts``), on a
#: queue of its own: every worker process has a consumer on each queue, so a
#: contract sent alone is fetched as soon as it is queued instead of behind an
#: import, and runs before the import messages its worker has already fetched.
send_contract_bulk = dramatiq.actor(
    actor_name=SendContract.bulk_actor_name,
    queue_name=SendContract.bulk_queue_name,
    priority=BULK_PRIORITY,
    # The same contracts as send_contract, so the same retry policy (SEND_CONTRACT_*).
    **actor_options(SendContract.actor_name),
)(send_contract.fn)


def _record(
    message: SendContract, *, settings: Settings, now: datetime, access_code: CodeSource | None
) -> tuple[list[int], Prepared | None]:
    """``record_contract`` in a transaction; the invitation's claim when it is the one delivery."""
    first: Prepared | None = None
    with session_scope() as session:
        # The invitation is recorded already claimed, its claim committing with
        # the contract (no transaction of its own before its first attempt), and
        # composed from what this transaction wrote (not claimed and read back).
        recorded = record_contract(
            session,
            message,
            reminders=settings.reminder_policy(),
            now=now,
            access_code=access_code,
            claim_lease=timedelta(seconds=settings.send_lease_seconds),
        )
        if recorded.invitation is None and len(recorded.delivery_ids) == 1:
            # Redelivered after its commit: the invitation is claimed as any delivery.
            first = prepare(session, recorded.delivery_ids[0], settings=settings, now=now)
    if recorded.invitation is not None:
        first = prepare_invitation(message, recorded.invitation, settings=settings, now=now)
    return recorded.delivery_ids, first
