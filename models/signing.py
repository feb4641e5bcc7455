"""Signing: the client accepted every section; every signatory manager is told."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from models.contract import Contract, ContractStatus
from models.delivery import EmailKind, NewDelivery, add_delivery, pending_delivery_ids
from models.errors import (
    ContractNotReady,
    ContractNotSignable,
    Rejected,
    SectionsNotAllAccepted,
    UnknownContract,
    UnknownSection,
)
from models.messages import NotifySignatories
from models.reminders import stop_reminders


def _check_signable(contract: Contract | None, message: NotifySignatories) -> Contract:
    if contract is None:
        raise UnknownContract(f"no contract has id {message.contract_id!r}")
    if contract.status == ContractStatus.QUEUED:
        raise ContractNotReady(f"contract {contract.id!r} has not been sent yet")
    if contract.status in (ContractStatus.REJECTED, ContractStatus.CANCELLED):
        raise ContractNotSignable(f"contract {contract.id!r} is {contract.status} and cannot be signed")
    sent = contract.section_ids()
    accepted = set(message.accepted_sections)
    unknown = [section for section in message.accepted_sections if section not in sent]
    if unknown:
        raise UnknownSection(f"not sections of contract {contract.id!r}: {', '.join(unknown)}")
    missing = [section for section in sent if section not in accepted]
    if missing:
        raise SectionsNotAllAccepted(
            f"every section must be accepted before signing; not accepted: {', '.join(missing)}"
        )
    return contract


def record_signature(session: Session, message: NotifySignatories, *, now: datetime) -> list[int]:
    """Check, record the signature and one notification per signatory (one transaction).

    Returns the deliveries to enqueue after commit; a repeated message returns the
    ones still pending.
    """
    contract = _check_signable(
        session.get(Contract, message.contract_id, with_for_update=True, populate_existing=True), message
    )
    if contract.status == ContractStatus.SIGNED:
        return pending_delivery_ids(session, contract.id, EmailKind.SIGNED_NOTIFICATION)
    contract.status = ContractStatus.SIGNED
    contract.signed_at = message.signed_at or now
    stop_reminders(contract)
    contract.legal_name = message.legal_name
    contract.registration_number = message.registration_number
    contract.signer_name = message.signer_name
    contract.error_code = None
    contract.error_message = None
    contract.updated_at = now
    session.add(contract)
    session.flush()
    for signatory in contract.signatories:
        add_delivery(
            session,
            kind=EmailKind.SIGNED_NOTIFICATION,
            delivery=NewDelivery(
                contract_id=contract.id,
                recipient=str(signatory["email"]),
                recipient_name=signatory.get("name"),
                locale=contract.locale,
            ),
        )
    return pending_delivery_ids(session, contract.id, EmailKind.SIGNED_NOTIFICATION)


def record_signature_rejection(
    session: Session, contract_id: str, rejection: Rejected, *, now: datetime
) -> None:
    """Keep a refused signature's reason on the contract; its status does not change."""
    contract = session.get(Contract, contract_id, with_for_update=True, populate_existing=True)
    # A rejected contract's error is the reason its send was refused: keep it.
    if contract is None or contract.status in (
        ContractStatus.SIGNED,
        ContractStatus.REJECTED,
        ContractStatus.CANCELLED,
    ):
        return
    contract.error_code = rejection.code
    contract.error_message = rejection.message
    contract.updated_at = now
    session.add(contract)


def check_notify_signatories(session: Session, message: NotifySignatories) -> None:
    """The producer-side check: the same rules, read-only, before enqueueing."""
    contract = session.get(Contract, message.contract_id)
    if contract is not None and contract.status == ContractStatus.QUEUED:
        # The send may still be in flight; the actor waits for it.
        return
    _check_signable(contract, message)
