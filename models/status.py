"""What a producer can ask about a contract: its status and each email's."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from pydantic import BaseModel
from sqlmodel import Session, col, select

from models.contract import Contract
from models.delivery import EmailDelivery
from models.upsert import chunks


class ErrorReport(BaseModel):
    """A refusal's stable code and its explanation."""

    code: str
    message: str


class EmailReport(BaseModel):
    """One email of a contract."""

    kind: str
    to: str
    step: int
    status: str
    attempts: int
    provider_message_id: str | None
    last_error: str | None
    sent_at: datetime | None


class ContractReport(BaseModel):
    """A contract's status (``contract-status --json`` prints exactly this)."""

    contract_id: str
    status: str
    error: ErrorReport | None
    lead_source: str | None
    signed_at: datetime | None
    cancelled_at: datetime | None
    reminder_count: int
    next_reminder_at: datetime | None
    emails: list[EmailReport]


def _report(contract: Contract, deliveries: Iterable[EmailDelivery]) -> ContractReport:
    error = (
        ErrorReport(code=contract.error_code, message=contract.error_message or "")
        if contract.error_code
        else None
    )
    return ContractReport(
        contract_id=contract.id,
        status=contract.status,
        error=error,
        lead_source=contract.lead_source or None,
        signed_at=contract.signed_at,
        cancelled_at=contract.cancelled_at,
        reminder_count=contract.reminder_count,
        next_reminder_at=contract.next_reminder_at,
        emails=[
            EmailReport(
                kind=delivery.kind,
                to=delivery.recipient,
                step=delivery.step,
                status=delivery.status,
                attempts=delivery.attempts,
                provider_message_id=delivery.provider_message_id,
                last_error=delivery.last_error,
                sent_at=delivery.sent_at,
            )
            for delivery in deliveries
        ],
    )


def contract_report(session: Session, contract_id: str) -> ContractReport | None:
    """The report of one contract, or None if no contract has this id."""
    contract = session.get(Contract, contract_id)
    if contract is None:
        return None
    deliveries = session.exec(
        select(EmailDelivery)
        .where(EmailDelivery.contract_id == contract_id)
        .order_by(col(EmailDelivery.created_at), col(EmailDelivery.id))
    ).all()
    return _report(contract, deliveries)


def contract_reports(session: Session, contract_ids: Sequence[str]) -> dict[str, ContractReport]:
    """The reports of the contracts that exist among ``contract_ids``: two queries per 500 ids."""
    reports: dict[str, ContractReport] = {}
    for chunk in chunks(sorted(set(contract_ids))):
        contracts = session.exec(select(Contract).where(col(Contract.id).in_(chunk))).all()
        deliveries: dict[str, list[EmailDelivery]] = {}
        for delivery in session.exec(
            select(EmailDelivery)
            .where(col(EmailDelivery.contract_id).in_(chunk))
            .order_by(col(EmailDelivery.created_at), col(EmailDelivery.id))
        ):
            deliveries.setdefault(delivery.contract_id, []).append(delivery)
        for contract in contracts:
            reports[contract.id] = _report(contract, deliveries.get(contract.id, []))
    return reports
