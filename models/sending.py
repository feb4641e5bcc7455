"""Sending a contract: the send_contract transaction and its producer-side check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CompoundSelect, bindparam, func, literal_column, null, sql, union_all, update
from sqlmodel import Session, col, select

from models.access_codes import CodeSource, apply_access_code, given_code, needs_access_code
from models.account import Account
from models.binding import bind_account, check_binding
from models.contract import Contract, ContractStatus
from models.delivery import (
    DeliveryRow,
    EmailDelivery,
    EmailKind,
    NewDelivery,
    add_claimed_delivery,
    add_delivery,
    cancel_delivery,
    pending_delivery_ids,
)
from models.errors import ContractClosed, ContractConflict, Rejected, UnknownContract
from models.messages import SendContract
from models.reminders import CYCLE_FIELDS, ReminderPolicy, cycle_start, start_cycle
from models.upsert import chunks, insert_ignoring_conflict, insert_many_returning, table_of
from models.workspace import (
    ResourceGroup,
    Workspace,
    choose_resource_group,
    fold_groups,
    resource_groups_of_many,
    workspace_group_pairs,
)

#: Statuses in which a send_contract may (re)do its work; later ones are final for it.
OPEN_STATUSES = (ContractStatus.QUEUED, ContractStatus.REJECTED)


def _contract_fields(message: SendContract) -> dict[str, object]:
    return {
        "content_hash": message.content_hash(),
        "workspace_id": message.workspace_id,
        "resource_group_id": message.resource_group_id,
        "email": message.email,
        "company_name": message.company_name,
        "lead_source": message.lead_source.value,
        "title": message.title,
        "locale": message.locale,
        "sections": [section.model_dump(mode="json", exclude_none=True) for section in message.sections],
        "signatories": [
            signatory.model_dump(mode="json", exclude_none=True) for signatory in message.signatories
        ],
    }


def _set_content(contract: Contract, message: SendContract) -> None:
    for name, value in _contract_fields(message).items():
        setattr(contract, name, value)


def _queued_row(contract_id: str, fields: dict[str, object], *, now: datetime) -> dict[str, object]:
    """A contract row as the producer reserves it: queued, with the message's content."""
    return {
        "id": contract_id,
        "status": ContractStatus.QUEUED.value,
        "created_at": now,
        "updated_at": now,
        **fields,
    }


def _insert_queued(session: Session, contract_id: str, fields: dict[str, object], *, now: datetime) -> bool:
    """Insert the queued row unless the contract exists; True if this call inserted it."""
    return insert_ignoring_conflict(
        session, Contract, _queued_row(contract_id, fields, now=now), conflict_columns=["id"]
    )


# Built once: a reused statement keeps its cache key (every send_contract runs it).
_CONTRACT_FOR_UPDATE = (
    select(Contract)
    .where(col(Contract.id) == bindparam("contract_id"))
    .with_for_update()
    .execution_options(populate_existing=True)
)


def _locked_contract(session: Session, contract_id: str) -> Contract | None:
    """The contract row, locked for this transaction and read afresh, or None."""
    return session.exec(_CONTRACT_FOR_UPDATE, params={"contract_id": contract_id}).first()


def _check_same_content(stored_hash: str | None, message: SendContract) -> None:
    """Refuse a message whose contract id was recorded with other content (``stored_hash``)."""
    if stored_hash and stored_hash != message.content_hash():
        raise ContractConflict(
            f"contract {message.contract_id!r} was already received with different content; "
            "use a new contract id for a different contract"
        )


@dataclass(frozen=True)
class ContractState:
    """What sending decides on: a recorded contract's status and content hash."""

    id: str
    status: str
    #: Empty for a contract first recorded from a message too broken to parse.
    content_hash: str

    @classmethod
    def of(cls, row: Any) -> ContractState:
        return cls(id=str(row.id), status=str(row.status), content_hash=str(row.content_hash or ""))


# Built once: the state sending decides on, as plain values (read for every send).
_CONTRACT_STATE = select(col(Contract.id), col(Contract.status), col(Contract.content_hash)).where(
    col(Contract.id) == bindparam("contract_id")
)

_CONTRACTS, _WORKSPACES, _GROUPS = table_of(Contract), table_of(Workspace), table_of(ResourceGroup)

# Built once, for the actor: the same state, locked, beside the message's workspace
# and its resource groups (one row per group; the workspace NULL when it is not
# registered), so rule 1 costs no round trip of its own. Only the contract's row is
# locked, as when the workspace was read apart.
_STATE_AND_GROUPS_FOR_UPDATE = (
    sql.select(
        _CONTRACTS.c.id,
        _CONTRACTS.c.status,
        _CONTRACTS.c.content_hash,
        _WORKSPACES.c.id.label("workspace_id"),
        _GROUPS.c.id.label("resource_group_id"),
    )
    .select_from(
        _CONTRACTS.outerjoin(_WORKSPACES, _WORKSPACES.c.id == bindparam("workspace_id")).outerjoin(
            _GROUPS, _GROUPS.c.workspace_id == _WORKSPACES.c.id
        )
    )
    .where(_CONTRACTS.c.id == bindparam("contract_id"))
    .order_by(_GROUPS.c.id)
    .with_for_update(of=_CONTRACTS)
)
_RECORD_SENT = (
    update(_CONTRACTS)
    .where(_CONTRACTS.c.id == bindparam("contract_id"))
    .values(
        status=ContractStatus.SENT.value,
        resource_group_id=bindparam("resource_group_id"),
        account_id=bindparam("account_id"),
        access_code_issued=bindparam("access_code_issued"),
        sent_at=bindparam("now"),
        updated_at=bindparam("now"),
        error_code=None,
        error_message=None,
        **{name: bindparam(name) for name in CYCLE_FIELDS},
    )
)


def _locked_state(
    session: Session, message: SendContract, *, now: datetime
) -> tuple[ContractState, list[str] | None]:
    """The contract's state, the row created as queued if absent and locked, and the
    resource groups of the message's workspace (None: not registered).

    Plain values, not an ORM object: this runs for every send_contract, and the
    row is then changed by one UPDATE rather than through the unit of work.
    """
    params = {"contract_id": message.contract_id, "workspace_id": message.workspace_id}
    rows = session.connection().execute(_STATE_AND_GROUPS_FOR_UPDATE, params).all()
    if not rows:
        _insert_queued(session, message.contract_id, _contract_fields(message), now=now)
        rows = session.connection().execute(_STATE_AND_GROUPS_FOR_UPDATE, params).all()
    pairs = ((row.workspace_id, row.resource_group_id) for row in rows if row.workspace_id is not None)
    return ContractState.of(rows[0]), fold_groups(pairs, {}).get(message.workspace_id)


@dataclass(frozen=True, kw_only=True)
class ClaimedInvitation:
    """An invitation recorded already claimed, and what its email needs that the transaction knew."""

    delivery: DeliveryRow
    #: When the client first logged in (None: never, so the email may carry a code).
    first_login_at: datetime | None
    #: The code columns given to the account in this transaction (None: no code issued).
    access_code: Mapping[str, object] | None


@dataclass(frozen=True, kw_only=True)
class RecordedContract:
    """What ``record_contract`` recorded: the deliveries to send once committed."""

    delivery_ids: list[int]
    #: The one delivery, already claimed, when ``claim_lease`` was given and it is new.
    invitation: ClaimedInvitation | None = None


def record_contract(
    session: Session,
    message: SendContract,
    *,
    reminders: ReminderPolicy,
    now: datetime,
    access_code: CodeSource | None = None,
    claim_lease: timedelta | None = None,
) -> RecordedContract:
    """Validate, bind, issue codes, record the contract and its invitation (one transaction).

    Returns the ids of the deliveries to enqueue once the caller has committed. A
    repeated identical message returns the still-pending deliveries, so a worker
    that died between commit and enqueue loses nothing when the message comes back.

    ``access_code``: where a new code's account columns come from, asked only for
    an account that needs one (see ``with_access_code``): hashed on demand inside
    this transaction on PostgreSQL, before it on SQLite, where every other
    worker's transaction would wait behind the hash. An account that needs a
    code when none was given raises ``AccessCodeNeeded``.

    ``claim_lease``: for a caller that sends the invitation itself after the
    commit, the invitation is recorded already claimed for that long
    (``add_claimed_delivery``) and returned with what its email says
    (``RecordedContract.invitation``): two round trips fewer than claiming it and
    reading it back.
    """
    state, groups = _locked_state(session, message, now=now)
    _check_same_content(state.content_hash, message)
    if state.status not in OPEN_STATUSES:
        return RecordedContract(
            delivery_ids=pending_delivery_ids(session, message.contract_id, EmailKind.INVITATION)
        )

    resource_group_id = choose_resource_group(message.workspace_id, message.resource_group_id, groups)
    account, created = bind_account(
        session,
        email=message.email,
        company_name=message.company_name,
        # A new account is inserted with its code: one statement instead of four.
        new_account_fields=lambda: dict(given_code(access_code)),
    )
    issue_codes = needs_access_code(account)
    if issue_codes and not created:
        fields = given_code(access_code)
        # The whole row (locked by bind_account in this transaction), to issue a code on it.
        codes_account = session.get_one(Account, account.id)
        apply_access_code(codes_account, fields)
        session.add(codes_account)

    statement = _RECORD_SENT
    if not state.content_hash:
        # A contract first recorded from a message too broken to parse has no
        # content (and no content hash): the first valid message gives it its content.
        statement = statement.values(_contract_fields(message))
    session.connection().execute(
        statement,
        {
            "contract_id": message.contract_id,
            "resource_group_id": resource_group_id,
            "account_id": account.id,
            "access_code_issued": issue_codes,
            "now": now,
            **cycle_start(now=now, policy=reminders),
        },
    )
    # The contract was open, so it has had no invitation yet: this one is the
    # only one pending.
    invitation = NewDelivery(
        contract_id=message.contract_id,
        recipient=message.email,
        recipient_name=None,
        locale=message.locale,
        includes_access_code=issue_codes,
    )
    if claim_lease is not None:
        claimed = add_claimed_delivery(
            session, kind=EmailKind.INVITATION, delivery=invitation, now=now, lease=claim_lease
        )
        if claimed is not None:
            return RecordedContract(
                delivery_ids=[claimed.id],
                invitation=ClaimedInvitation(
                    delivery=claimed,
                    first_login_at=account.first_login_at,
                    access_code=given_code(access_code) if issue_codes else None,
                ),
            )
    return RecordedContract(
        delivery_ids=[add_delivery(session, kind=EmailKind.INVITATION, delivery=invitation)]
    )


def record_send_rejection(
    session: Session, contract_id: str, rejection: Rejected, *, message: SendContract | None, now: datetime
) -> None:
    """Make a refused send visible as the contract's status (the caller commits).

    Only a contract that is not yet sent changes: a bad or conflicting duplicate
    of a contract already sent must not mark the good one rejected.
    """
    if isinstance(rejection, ContractConflict):
        return
    # A message too broken to parse still needs the NOT NULL JSON columns filled.
    fields = _contract_fields(message) if message is not None else {"sections": [], "signatories": []}
    _insert_queued(session, contract_id, fields, now=now)
    contract = _locked_contract(session, contract_id)
    if contract is None or contract.status not in OPEN_STATUSES:
        return
    contract.status = ContractStatus.REJECTED
    contract.error_code = rejection.code
    contract.error_message = rejection.message
    contract.updated_at = now
    session.add(contract)


def _check_rules(
    message: SendContract, *, stored_hash: str | None, groups: list[str] | None, bound_company: str | None
) -> None:
    """The producer-side rules on what was read: the same for one contract or many."""
    _check_same_content(stored_hash, message)
    choose_resource_group(message.workspace_id, message.resource_group_id, groups)
    # Called for unknown addresses too: a known and an unknown address take the
    # same queries and the same steps, so the answer's timing tells nothing.
    check_binding(bound_company=bound_company, requested_company=message.company_name)


def _send_check_reads() -> CompoundSelect[Any]:
    """What the producer's check reads, as one statement (one round trip, not three).

    Rows tagged in their last column: ``contract`` (status, content hash) if the
    contract is recorded, ``account`` (bound company) if the address is bound,
    ``pending`` (company) for the earliest other contract to the address still
    queued, and the ``workspace_group_pairs`` of the workspace if it is registered.
    """
    contracts, accounts = table_of(Contract), table_of(Account)
    earliest_pending = (
        sql.select(contracts.c.company_name)
        .where(
            contracts.c.email == bindparam("email"),
            contracts.c.status == ContractStatus.QUEUED.value,
            contracts.c.id != bindparam("contract_id"),
        )
        .order_by(contracts.c.created_at, contracts.c.id)
        .limit(1)
        .subquery()
    )
    return union_all(
        sql.select(contracts.c.status, contracts.c.content_hash, literal_column("'contract'")).where(
            contracts.c.id == bindparam("contract_id")
        ),
        sql.select(accounts.c.company_name, null(), literal_column("'account'")).where(
            accounts.c.email == bindparam("email")
        ),
        sql.select(earliest_pending.c.company_name, null(), literal_column("'pending'")),
        workspace_group_pairs()
        .add_columns(literal_column("'workspace'"))
        .where(col(Workspace.id) == bindparam("workspace_id")),
    )


# Built once: every send_contract runs it.
_SEND_CHECK_READS = _send_check_reads()


def check_send_contract(session: Session, message: SendContract) -> ContractState | None:
    """The producer-side check: the same rules, read-only, before enqueueing.

    Returns the existing contract's state when this exact message was already accepted.
    """
    rows = session.connection().execute(
        _SEND_CHECK_READS,
        {"contract_id": message.contract_id, "email": message.email, "workspace_id": message.workspace_id},
    )
    existing: ContractState | None = None
    bound_company: str | None = None
    pending_company: str | None = None
    workspace_rows: list[tuple[str, str | None]] = []
    for first, second, tag in rows:
        if tag == "contract":
            existing = ContractState(
                id=message.contract_id, status=str(first), content_hash=str(second or "")
            )
        elif tag == "account":
            bound_company = str(first)
        elif tag == "pending":
            pending_company = str(first)
        else:
            workspace_rows.append((first, second))
    groups = fold_groups(workspace_rows, {}).get(message.workspace_id)
    _check_rules(
        message,
        stored_hash=existing.content_hash if existing is not None else None,
        groups=groups,
        bound_company=bound_company if bound_company is not None else pending_company,
    )
    return existing


class SendChecks:
    """``check_send_contract`` for a batch: what it reads, read once for all (four queries)."""

    def __init__(self, session: Session, messages: Sequence[SendContract]) -> None:
        #: The contracts already recorded, as read.
        self.read: dict[str, Contract] = {}
        #: The content hash of each contract accepted earlier in this batch (not written yet).
        self.accepted_here: dict[str, str] = {}
        self.bound: dict[str, str] = {}
        #: Per address, its contracts still queued (id, company), earliest first.
        self.pending: dict[str, list[tuple[str, str]]] = {}
        #: The company of the first contract accepted in this batch per address not bound yet.
        self.claimed_here: dict[str, str] = {}
        for ids in chunks(sorted({message.contract_id for message in messages})):
            self.read.update(
                (contract.id, contract)
                for contract in session.exec(select(Contract).where(col(Contract.id).in_(ids)))
            )
        self.groups = resource_groups_of_many(session, (message.workspace_id for message in messages))
        for emails in chunks(sorted({message.email for message in messages})):
            self.bound.update(
                session.exec(
                    select(Account.email, Account.company_name).where(col(Account.email).in_(emails))
                ).all()
            )
            pending = session.exec(
                select(Contract.email, Contract.id, Contract.company_name)
                .where(col(Contract.email).in_(emails), col(Contract.status) == ContractStatus.QUEUED.value)
                .order_by(col(Contract.created_at), col(Contract.id))
            )
            for email, contract_id, company_name in pending:
                self.pending.setdefault(email, []).append((contract_id, company_name))

    def _bound_company(self, message: SendContract) -> str | None:
        """The name the address is bound to, or will be by the contracts queued before this one."""
        bound = self.bound.get(message.email)
        if bound is not None:
            return bound
        for contract_id, company_name in self.pending.get(message.email, ()):
            if contract_id != message.contract_id:
                return company_name
        return self.claimed_here.get(message.email)

    def check(self, message: SendContract) -> ContractState | None:
        """``check_send_contract`` on what was read; returns the existing contract's state as read."""
        existing = self.read.get(message.contract_id)
        stored_hash = self.accepted_here.get(message.contract_id)
        if stored_hash is None and existing is not None:
            stored_hash = existing.content_hash
        _check_rules(
            message,
            stored_hash=stored_hash,
            groups=self.groups.get(message.workspace_id),
            bound_company=self._bound_company(message),
        )
        return ContractState.of(existing) if existing is not None else None

    def accepted(self, message: SendContract) -> None:
        """Later lines of the batch are checked against this one (not written yet).

        A later copy of the same contract against its content; a later contract
        to the same address not bound yet against its company: the first contract
        sent to an address binds it, so the worker would refuse the other name.
        """
        self.accepted_here.setdefault(message.contract_id, message.content_hash())
        self.claimed_here.setdefault(message.email, message.company_name)


def reserve_contract(session: Session, message: SendContract, *, now: datetime) -> bool:
    """Record a contract as queued before its message is enqueued (producer side).

    A contract refused earlier and sent again unchanged goes back to queued: the
    rules are evaluated afresh (the workspace may have been fixed since). Returns
    whether the row was created by this call.
    """
    created = _insert_queued(session, message.contract_id, _contract_fields(message), now=now)
    if created:
        return True
    contract = _locked_contract(session, message.contract_id)
    if contract is not None and contract.status == ContractStatus.REJECTED:
        _set_content(contract, message)
        contract.status = ContractStatus.QUEUED
        contract.error_code = None
        contract.error_message = None
        contract.updated_at = now
        session.add(contract)
    return False


def reserve_new_contract(session: Session, message: SendContract, *, now: datetime) -> bool:
    """Record a contract the check found unrecorded as queued (one insert); False if it exists by now.

    The caller then takes ``reserve_contract``'s path, in a transaction.
    """
    return _insert_queued(session, message.contract_id, _contract_fields(message), now=now)


def check_recorded_content(session: Session, message: SendContract) -> None:
    """Refuse a message whose contract was recorded meanwhile with other content.

    For a producer whose check found no contract and whose insert then found one
    (another producer's, same id): its worker would only dead-letter the message.
    """
    row = session.connection().execute(_CONTRACT_STATE, {"contract_id": message.contract_id}).first()
    if row is not None:
        _check_same_content(ContractState.of(row).content_hash, message)


def reserve_contracts(
    session: Session, messages: Sequence[SendContract], *, existing: Mapping[str, Contract], now: datetime
) -> set[str]:
    """``reserve_contract`` for a batch checked by ``SendChecks``; returns the ids this call created.

    Contracts not there when checked are inserted by one executemany; only the
    rare others (refused earlier, or reserved by a concurrent producer since the
    check) take ``reserve_contract`` one by one. A contract already queued is
    left as it is, as ``reserve_contract`` would.
    """
    # A contract sent twice in the batch is inserted once.
    new = {message.contract_id: message for message in messages if message.contract_id not in existing}
    created = insert_many_returning(
        session,
        Contract,
        [_queued_row(message.contract_id, _contract_fields(message), now=now) for message in new.values()],
        conflict_columns=["id"],
        returning="id",
    )
    for message in messages:
        found = existing.get(message.contract_id)
        raced = found is None and message.contract_id not in created
        if raced or (found is not None and found.status == ContractStatus.REJECTED):
            reserve_contract(session, message, now=now)
    return created


def release_reservation(session: Session, contract_id: str) -> None:
    """Forget a queued contract whose message could not be enqueued."""
    contract = session.get(Contract, contract_id, with_for_update=True)
    if contract is not None and contract.status == ContractStatus.QUEUED:
        session.delete(contract)


def resend_invitation(
    session: Session,
    contract_id: str,
    *,
    reminders: ReminderPolicy,
    now: datetime,
    access_code: CodeSource | None = None,
) -> int:
    """Send the invitation again (a new step) and restart the reminders; returns the delivery id.

    A client who never logged in gets a new temporary password (the previous
    one stops working): a resend usually means the first email was lost or
    its code expired. ``access_code`` as for ``record_contract``
    (``with_access_code``).
    """
    contract = check_resend_invitation(_locked_contract(session, contract_id), contract_id)
    account = (
        session.get(Account, contract.account_id, with_for_update=True)
        if contract.account_id is not None
        else None
    )
    issue_codes = account is not None and needs_access_code(account)
    if account is not None and issue_codes:
        apply_access_code(account, given_code(access_code))
        session.add(account)
    last_step = session.exec(
        select(func.max(EmailDelivery.step)).where(
            EmailDelivery.contract_id == contract.id, EmailDelivery.kind == EmailKind.INVITATION.value
        )
    ).one()
    step = (last_step or 0) + 1
    # An earlier step not sent yet (its message lost in a broker outage, say) would go
    # out late, beside this one, with a temporary password this step replaces.
    for superseded in pending_delivery_ids(session, contract.id, EmailKind.INVITATION):
        cancel_delivery(session, superseded, reason=f"replaced by invitation step {step}", now=now)
    start_cycle(contract, now=now, policy=reminders)
    contract.updated_at = now
    session.add(contract)
    return add_delivery(
        session,
        kind=EmailKind.INVITATION,
        delivery=NewDelivery(
            contract_id=contract.id,
            recipient=contract.email,
            recipient_name=None,
            locale=contract.locale,
            step=step,
            includes_access_code=issue_codes,
        ),
    )


def check_resend_invitation(contract: Contract | None, contract_id: str) -> Contract:
    """Only a contract sent and not signed, cancelled or rejected can be sent again."""
    if contract is None:
        raise UnknownContract(f"no contract has id {contract_id!r}")
    if contract.status != ContractStatus.SENT:
        raise ContractClosed(
            f"contract {contract_id!r} is {contract.status}: its invitation cannot be sent again"
        )
    return contract
