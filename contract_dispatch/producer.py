"""The Python producer API: the same checks as the actors, before enqueueing.

A manager sees a refusal at once (``Rejected`` with its code); the actors check
again when they process the message, because two sends can race.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from models.access_codes import CodeSource, with_access_code
from models.cancelling import cancel_queued, check_cancel_contract
from models.contract import ContractStatus
from models.delivery import EmailDelivery
from models.errors import BrokerUnavailable, RefusalsRateLimited, Rejected
from models.messages import (
    CancelContract,
    NotifySignatories,
    SendContract,
    WireMessage,
    checked_contract_id,
    is_valid_identifier,
    parse_message,
)
from models.sending import (
    OPEN_STATUSES,
    ContractState,
    SendChecks,
    check_recorded_content,
    check_send_contract,
    release_reservation,
    reserve_contract,
    reserve_contracts,
    reserve_new_contract,
)
from models.sending import resend_invitation as _resend_invitation
from models.signing import check_notify_signatories
from models.status import ContractReport, contract_report, contract_reports
from models.types import utc_now
from models.workspace import all_workspaces
from models.workspace import set_workspace as _set_workspace
from workers.broker_errors import BROKER_ERRORS, BatchMaybeQueued, broker_problem
from workers.database import (
    autocommit_session,
    raising_unavailable,
    require_database,
    session_scope,
    transactions_lock_rows,
)
from workers.refusal_limit import RefusalLimit, refusal_limit
from workers.reminders import SweepReport, run_sweep
from workers.settings import get_settings

#: What enqueueing raises when the broker (Redis or RabbitMQ) cannot be used.
_BROKER_ERRORS = (*BROKER_ERRORS, OSError)


class Receipt(BaseModel):
    """What a producer gets back: the contract and its status after the call."""

    contract_id: str
    status: str


class ResendReceipt(Receipt):
    """A resent invitation: its step (0 was the first invitation)."""

    step: int


def _enqueue(message: WireMessage) -> None:
    # Imported here: importing the actors connects to the broker, which the
    # read-only parts of this API never need.
    import actors

    actor = actors.broker.get_actor(message.actor_name)
    try:
        actor.send(message.to_payload())
    except _BROKER_ERRORS as exc:
        raise BrokerUnavailable(f"the message broker {broker_problem(exc)}; nothing was sent") from None


def _enqueue_many(messages: Sequence[WireMessage]) -> None:
    """Enqueue messages in one round trip to the broker (see ``workers.redis_dispatch``).

    Each goes to its message's bulk actor when it has one (``send_contract_bulk``,
    queue ``contracts-bulk``), so that a batch never delays the messages sent one
    at a time.
    """
    if not messages:
        return
    import actors
    from workers.redis_dispatch import enqueue_many

    prepared = [
        actors.broker.get_actor(message.bulk_actor_name or message.actor_name).message(message.to_payload())
        for message in messages
    ]
    try:
        enqueue_many(actors.broker, prepared)
    except BatchMaybeQueued as exc:
        raise BrokerUnavailable(
            f"the message broker {broker_problem(exc)} after the batch was handed to it, before it "
            "answered: the batch may have been queued (sending the same contracts again is safe)",
            maybe_sent=True,
        ) from None
    except _BROKER_ERRORS as exc:
        raise BrokerUnavailable(f"the message broker {broker_problem(exc)}; nothing was sent") from None


def _check_within_limit(
    message: SendContract,
    limit: RefusalLimit | None,
    check: Callable[[SendContract], ContractState | None],
    *,
    ensure_open: bool = True,
) -> ContractState | None:
    """``check`` (the producer's rules) under the workspace's refusal limit.

    While the workspace is past its limit nothing is checked
    (``RefusalsRateLimited``), so that answer says nothing about the address, the
    name or the contract; each refusal counts towards the limit.
    """
    if limit is not None and ensure_open:
        limit.ensure_open(message.workspace_id)
    try:
        return check(message)
    except Rejected:
        if limit is not None:
            limit.record(message.workspace_id)
        raise


@raising_unavailable
def submit_send_contract(message: SendContract) -> Receipt:
    """Check and enqueue a parsed send_contract message (see ``_check_within_limit``).

    No transaction around the check and a new contract's reservation: the check
    only reads, and the reservation is one insert that ignores a conflict (two
    round trips to PostgreSQL instead of four). A contract already recorded, or
    inserted by another producer meanwhile, is reserved in a transaction
    (``reserve_contract`` locks it).
    """
    limit = refusal_limit()
    with autocommit_session() as session:
        existing = _check_within_limit(message, limit, lambda message: check_send_contract(session, message))
        if existing is not None and existing.status not in OPEN_STATUSES:
            # The same contract was already accepted: sending it again changes nothing.
            return Receipt(contract_id=existing.id, status=existing.status)
        now = utc_now()
        created = existing is None and reserve_new_contract(session, message, now=now)
    if not created:
        with session_scope() as session:
            if existing is None:
                # Another producer recorded it since the check: the same content, or refused now.
                _check_within_limit(
                    message,
                    limit,
                    lambda message: check_recorded_content(session, message),
                    ensure_open=False,
                )
            created = reserve_contract(session, message, now=now)
    try:
        _enqueue(message)
    except BrokerUnavailable:
        if created:
            with session_scope() as session:
                release_reservation(session, message.contract_id)
        raise
    return Receipt(contract_id=message.contract_id, status=ContractStatus.QUEUED.value)


def _listed(value: Any) -> Any:
    """A list or tuple as a list; anything else as it is, for validation to refuse.

    ``list()`` would crash on ``None`` or a number and split a string into
    characters (``"tarifs"`` would become six sections): the wire contract's
    validation gives those their ``invalid_payload`` refusal instead.
    """
    return list(value) if isinstance(value, list | tuple) else value


def _send_contract_payload(
    *,
    contract_id: str,
    email: str,
    company_name: str,
    lead_source: str,
    workspace_id: str,
    signatories: Sequence[dict[str, Any]],
    sections: Sequence[dict[str, Any]],
    resource_group_id: str | None = None,
    title: str | None = None,
    locale: str = "fr",
) -> dict[str, Any]:
    """The wire payload of send_contract's keyword arguments (before validation)."""
    payload: dict[str, Any] = {
        "contract_id": contract_id,
        "email": email,
        "company_name": company_name,
        "lead_source": lead_source,
        "workspace_id": workspace_id,
        "signatories": _listed(signatories),
        "sections": _listed(sections),
        "locale": locale,
    }
    if resource_group_id is not None:
        payload["resource_group_id"] = resource_group_id
    if title is not None:
        payload["title"] = title
    return payload


@raising_unavailable
def send_contract(
    *,
    contract_id: str,
    email: str,
    company_name: str,
    lead_source: str,
    workspace_id: str,
    signatories: Sequence[dict[str, Any]],
    sections: Sequence[dict[str, Any]],
    resource_group_id: str | None = None,
    title: str | None = None,
    locale: str = "fr",
) -> Receipt:
    """Send a contract for signature; raises a ``Rejected`` subclass when it is refused.

    ``signatories`` are ``{"email": ..., "name": ...}`` objects and ``sections``
    ``{"id": ..., "title": ...}`` objects (name and title optional).
    """
    payload = _send_contract_payload(
        contract_id=contract_id,
        email=email,
        company_name=company_name,
        lead_source=lead_source,
        workspace_id=workspace_id,
        signatories=signatories,
        sections=sections,
        resource_group_id=resource_group_id,
        title=title,
        locale=locale,
    )
    return submit_send_contract(parse_message(SendContract, payload))


@raising_unavailable
def send_contracts(contracts: Iterable[Mapping[str, Any]]) -> list[Receipt | Rejected]:
    """Send many contracts at once: the checks of ``send_contract`` for each, one enqueue for all.

    Each item holds ``send_contract``'s keyword arguments. The checks and
    reservations run in one database transaction (what the checks need is read
    in four queries, the new contracts are inserted by one executemany) and the
    accepted messages are enqueued in one round trip to the broker, which is
    what makes this much cheaper per contract than ``send_contract`` in a loop.
    They go to ``send_contract_bulk`` on queue ``contracts-bulk``, consumed
    beside ``contracts`` by the same workers at a lower priority: a contract sent
    with ``send_contract`` meanwhile does not wait for the batch.

    Returns, in the order given, a ``Receipt`` for each contract accepted (or
    already accepted earlier) and the ``Rejected`` refusal for each refused one:
    a refusal does not stop the others. Raises ``BrokerUnavailable`` when the
    broker cannot be reached; then nothing was enqueued and the contracts this
    call reserved are forgotten. An item that is not a mapping, or whose keys
    are not ``send_contract``'s keyword arguments (unknown or missing), raises
    ``TypeError`` naming the item, before anything is checked.
    """
    # Parsed first: a malformed item is refused without a database round trip,
    # and a programming error (TypeError) surfaces before anything is written.
    parsed: list[SendContract | Rejected] = []
    for index, item in enumerate(contracts):
        try:
            payload = _send_contract_payload(**item)
        except TypeError:
            raise TypeError(f"send_contracts: item {index}: {_call_problem(item)}") from None
        try:
            parsed.append(parse_message(SendContract, payload))
        except Rejected as refusal:
            parsed.append(refusal)
    return submit_send_contracts(parsed)


def _call_problem(item: Any) -> str:
    """Why ``send_contract(**item)`` is not a call, in the public function's terms."""
    if not isinstance(item, Mapping):
        return f"a {type(item).__name__}, not a mapping of send_contract's keyword arguments"
    try:
        inspect.signature(send_contract).bind(**item)
    except TypeError as error:
        return f"send_contract() {error}"
    return "not send_contract's keyword arguments"


@raising_unavailable
def submit_send_contracts(parsed: Sequence[SendContract | Rejected]) -> list[Receipt | Rejected]:
    """``send_contracts`` for messages already parsed; a refusal given stays in its place.

    The bulk counterpart of ``submit_send_contract`` (the ``send-contracts``
    command parses JSON lines with ``parse_message`` and calls this).
    """
    results: list[Receipt | Rejected | SendContract] = list(parsed)
    messages = [message for message in results if isinstance(message, SendContract)]
    to_enqueue: list[SendContract] = []
    limit = refusal_limit()
    # Workspaces checked against the refusal limit in this call, and the answer
    # of those past it: nothing more of theirs is checked in this call.
    limit_checked: set[str] = set()
    limited: dict[str, Rejected] = {}
    with session_scope() as session:
        checks = SendChecks(session, messages)
        for index, message in enumerate(results):
            if not isinstance(message, SendContract):
                continue
            workspace_id = message.workspace_id
            try:
                if workspace_id in limited:
                    raise limited[workspace_id]
                # The limit is read once per workspace and call; each refusal still counts.
                first = workspace_id not in limit_checked
                limit_checked.add(workspace_id)
                existing = _check_within_limit(message, limit, checks.check, ensure_open=first)
            except RefusalsRateLimited as refusal:
                limited[workspace_id] = refusal
                results[index] = refusal
                continue
            except Rejected as refusal:
                results[index] = refusal
                continue
            if existing is not None and existing.status not in OPEN_STATUSES:
                results[index] = Receipt(contract_id=existing.id, status=existing.status)
                continue
            checks.accepted(message)
            to_enqueue.append(message)
        # Only a row this call inserted is released on failure, never one a
        # concurrent producer reserved between the check and here.
        created_ids = reserve_contracts(session, to_enqueue, existing=checks.read, now=utc_now())
    try:
        _enqueue_many(to_enqueue)
    except BrokerUnavailable as error:
        # Kept when the batch may be queued: its contracts are then processed as accepted.
        if created_ids and not error.maybe_sent:
            with session_scope() as session:
                for contract_id in created_ids:
                    release_reservation(session, contract_id)
        raise
    return [
        Receipt(contract_id=result.contract_id, status=ContractStatus.QUEUED.value)
        if isinstance(result, SendContract)
        else result
        for result in results
    ]


@raising_unavailable
def submit_notify_signatories(message: NotifySignatories) -> Receipt:
    """Check and enqueue a parsed notify_signatories message."""
    with session_scope() as session:
        check_notify_signatories(session, message)
    _enqueue(message)
    return Receipt(contract_id=message.contract_id, status=ContractStatus.QUEUED.value)


@raising_unavailable
def notify_signatories(
    *,
    contract_id: str,
    legal_name: str,
    accepted_sections: Sequence[str],
    registration_number: str | None = None,
    signer_name: str | None = None,
) -> Receipt:
    """Tell the signatories the client signed; raises ``Rejected`` when it is refused."""
    payload: dict[str, Any] = {
        "contract_id": contract_id,
        "legal_name": legal_name,
        "accepted_sections": _listed(accepted_sections),
    }
    if registration_number is not None:
        payload["registration_number"] = registration_number
    if signer_name is not None:
        payload["signer_name"] = signer_name
    return submit_notify_signatories(parse_message(NotifySignatories, payload))


@raising_unavailable
def contract_status(contract_id: str) -> ContractReport | None:
    """The contract's status and its emails', or None if no contract has this id.

    Raises ``DatabaseMissing`` when DATABASE_URL names a SQLite file that does not exist.
    """
    if not is_valid_identifier(contract_id):
        # No contract has it; and PostgreSQL would refuse some (a NUL) as a query parameter.
        return None
    # A mistyped SQLite path is an error, not a database where no contract is known.
    require_database()
    with session_scope() as session:
        return contract_report(session, contract_id)


@raising_unavailable
def contract_statuses(contract_ids: Iterable[str]) -> dict[str, ContractReport | None]:
    """``contract_status`` of many contracts, keyed by id in the order given (None: unknown).

    Two queries per 500 ids, however many there are.
    """
    wanted = list(dict.fromkeys(contract_ids))
    require_database()
    with session_scope() as session:
        found = contract_reports(session, [i for i in wanted if is_valid_identifier(i)])
    return {contract_id: found.get(contract_id) for contract_id in wanted}


@raising_unavailable
def workspaces() -> dict[str, list[str]]:
    """Every registered workspace and its resource group ids, ordered by id (read-only).

    Raises ``DatabaseMissing`` when DATABASE_URL names a SQLite file that does not exist.
    """
    require_database()
    with session_scope() as session:
        return all_workspaces(session)


@raising_unavailable
def set_workspace(workspace_id: str, resource_group_ids: Sequence[str]) -> None:
    """Create or update a workspace and its resource groups."""
    with session_scope() as session:
        _set_workspace(session, workspace_id, list(resource_group_ids))


@raising_unavailable
def cancel_contract(*, contract_id: str, reason: str | None = None) -> Receipt:
    """Cancel a contract not signed yet; raises ``Rejected`` when it cannot be.

    A contract still queued (no worker has taken it) is cancelled at once, and
    one already cancelled stays so: the receipt says ``cancelled`` and nothing is
    enqueued. Otherwise the cancel is queued for a worker (receipt ``queued``).
    """
    payload: dict[str, Any] = {"contract_id": contract_id}
    if reason is not None:
        payload["reason"] = reason
    message = parse_message(CancelContract, payload)
    with session_scope() as session:
        status = check_cancel_contract(session, message)
        # Only a contract read as queued can be (a sent one never is again).
        queued = status == ContractStatus.QUEUED and cancel_queued(session, message, now=utc_now())
        if queued or status == ContractStatus.CANCELLED:
            return Receipt(contract_id=contract_id, status=ContractStatus.CANCELLED.value)
    _enqueue(message)
    return Receipt(contract_id=contract_id, status=ContractStatus.QUEUED.value)


@raising_unavailable
def resend_invitation(contract_id: str) -> ResendReceipt:
    """Send the invitation again (a new step) and restart the reminder cycle, now."""
    from actors.deliver_email import enqueue_deliveries

    checked_contract_id(contract_id)
    settings = get_settings()
    now = utc_now()

    def record(code: CodeSource | None) -> tuple[int, ResendReceipt]:
        with session_scope() as session:
            delivery_id = _resend_invitation(
                session, contract_id, reminders=settings.reminder_policy(), now=now, access_code=code
            )
            step = session.get(EmailDelivery, delivery_id)
            assert step is not None
            return delivery_id, ResendReceipt(
                contract_id=contract_id, status=ContractStatus.SENT.value, step=step.step
            )

    delivery_id, receipt = with_access_code(
        record,
        policy=settings.access_code_policy(),
        now=now,
        hash_in_transaction=transactions_lock_rows(),
    )
    try:
        enqueue_deliveries([delivery_id])
    except _BROKER_ERRORS as exc:
        # Recorded but not enqueued: the stale-email sweep sends it later.
        raise BrokerUnavailable(
            f"the invitation is recorded but the broker {broker_problem(exc)}: the scheduler's "
            "sweep sends it once the broker is back and the email has waited longer than "
            "MAX_BACKOFF_MS plus 10 minutes; resend-invitation again, once the broker is back, "
            "sends a new step at once and cancels this one"
        ) from None
    return receipt


@raising_unavailable
def run_reminders(*, as_of: datetime | None = None) -> SweepReport:
    """Run one reminder sweep now (as if it were ``as_of``); the workers send what it claims."""
    return run_sweep(as_of=as_of)
