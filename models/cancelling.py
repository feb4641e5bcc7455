"""Cancelling a contract: no more reminders, and no pending invitation or reminder goes out."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlmodel import Session, col, select

from models.contract import Contract, ContractStatus
from models.delivery import DeliveryStatus, EmailDelivery, EmailKind, cancel_delivery
from models.errors import ContractClosed, UnknownContract
from models.messages import CancelContract
from models.reminders import stop_reminders
from models.upsert import affected_rows, table_of

#: Emails a cancelled contract no longer sends (managers' notifications are not among them).
CANCELLED_KINDS = (EmailKind.INVITATION.value, EmailKind.REMINDER.value)


def _check_cancellable(contract: Contract | None, contract_id: str) -> Contract:
    if contract is None:
        raise UnknownContract(f"no contract has id {contract_id!r}")
    if contract.status in (ContractStatus.SIGNED, ContractStatus.REJECTED):
        raise ContractClosed(f"contract {contract.id!r} is {contract.status} and cannot be cancelled")
    return contract


def record_cancellation(session: Session, message: CancelContract, *, now: datetime) -> list[str]:
    """Cancel (idempotent: cancelling a cancelled contract changes nothing).

    Returns the kind of each email this cancelled (it was pending).
    """
    contract = _check_cancellable(
        session.get(Contract, message.contract_id, with_for_update=True, populate_existing=True),
        message.contract_id,
    )
    if contract.status == ContractStatus.CANCELLED:
        return []
    contract.status = ContractStatus.CANCELLED
    contract.cancelled_at = now
    contract.cancel_reason = message.reason
    contract.updated_at = now
    stop_reminders(contract)
    session.add(contract)
    pending = session.exec(
        select(EmailDelivery.id, EmailDelivery.kind).where(
            EmailDelivery.contract_id == contract.id,
            EmailDelivery.status == DeliveryStatus.PENDING.value,
            col(EmailDelivery.kind).in_(CANCELLED_KINDS),
        )
    ).all()
    cancelled = []
    for delivery_id, kind in pending:
        if delivery_id is not None and cancel_delivery(
            session, delivery_id, reason="the contract was cancelled", now=now
        ):
            cancelled.append(kind)
    return cancelled


def cancel_queued(session: Session, message: CancelContract, *, now: datetime) -> bool:
    """Cancel a contract no worker has taken yet, at once; True if it was still queued.

    Its send_contract message then finds it cancelled and records and sends
    nothing (no account bound, no invitation). Waiting for the cancel message
    instead would be too late: the worker that records a contract sends its
    invitation in the same breath. One conditional ``UPDATE``: a worker holding
    the row (recording it) commits first, and the contract is then no longer queued.
    """
    table = table_of(Contract)
    result = session.connection().execute(
        update(table)
        .where(table.c.id == message.contract_id, table.c.status == ContractStatus.QUEUED.value)
        .values(
            status=ContractStatus.CANCELLED.value,
            cancelled_at=now,
            cancel_reason=message.reason,
            updated_at=now,
        )
    )
    return affected_rows(result) == 1


def check_cancel_contract(session: Session, message: CancelContract) -> str:
    """The producer-side check, read-only; returns the contract's status."""
    return str(_check_cancellable(session.get(Contract, message.contract_id), message.contract_id).status)


def unwanted_reason(status: str, kind: str) -> str | None:
    """Why an email of ``kind`` must not go out any more for a contract in ``status``, if it must not."""
    if kind in CANCELLED_KINDS and status == ContractStatus.CANCELLED:
        return "the contract was cancelled"
    if kind == EmailKind.REMINDER and status != ContractStatus.SENT:
        return f"the contract is {status}: no reminder"
    return None
