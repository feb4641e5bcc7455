"""Rule 7, reminders: clients who have not signed are reminded on the product's schedule.

A contract carries its reminder state: when its cycle started (the invitation,
or a manual resend), how many reminders it got, and when the next one is due
(None once signed, cancelled or rejected, or when the schedule is exhausted).
A sweep claims each due reminder with one UPDATE guarded by the count it read,
so two sweeps, or a sweep after a crash, can never send the same reminder twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import func, update
from sqlmodel import Column, Field, Session, SQLModel, col, select
from sqlmodel.sql.expression import SelectOfScalar

from models.access_codes import AccessCodePolicy, apply_access_code, issue_access_code, needs_access_code
from models.account import Account
from models.contract import Contract, ContractStatus
from models.delivery import DeliveryStatus, EmailDelivery, EmailKind, NewDelivery, add_deliveries
from models.types import UTCDateTime, utc_now
from models.upsert import affected_rows, chunks, table_of

#: Day names accepted in a sending window, Monday first (``datetime.weekday()``).
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, kw_only=True)
class ReminderPolicy:
    """When reminders go out: delays after the invitation, inside a weekly window."""

    #: Delay of each reminder after the start of the cycle; their count caps reminders.
    delays: tuple[timedelta, ...]
    #: Weekdays (0 = Monday) on which reminders may be sent.
    days: frozenset[int]
    #: Local opening and closing time of the window, each sending day.
    opens: time
    closes: time
    timezone: ZoneInfo = field(compare=False)
    #: Never two reminders to one contract closer than this (after an outage, say).
    min_gap: timedelta = timedelta(days=1)

    def in_window(self, moment: datetime) -> bool:
        """Whether ``moment`` is inside the sending window."""
        local = moment.astimezone(self.timezone)
        return local.weekday() in self.days and self.opens <= local.time().replace(tzinfo=None) < self.closes

    def next_in_window(self, moment: datetime) -> datetime:
        """``moment`` if it is inside the window, else the window's next opening."""
        if self.in_window(moment):
            return moment
        local = moment.astimezone(self.timezone)
        day = local.date()
        if local.time().replace(tzinfo=None) >= self.opens:
            day += timedelta(days=1)
        for _ in range(8):
            if day.weekday() in self.days:
                return datetime.combine(day, self.opens, tzinfo=self.timezone)
            day += timedelta(days=1)
        raise ValueError("the reminder window has no sending day")

    def due_at(self, cycle_started_at: datetime, count: int, *, now: datetime) -> datetime | None:
        """When reminder number ``count + 1`` is due, or None once they are all sent."""
        if count >= len(self.delays):
            return None
        planned = cycle_started_at + self.delays[count]
        if count > 0:
            planned = max(planned, now + self.min_gap)
        return self.next_in_window(planned)


#: The contract columns a reminder cycle (re)start sets.
CYCLE_FIELDS = ("reminder_cycle_started_at", "reminder_count", "next_reminder_at")


def cycle_start(*, now: datetime, policy: ReminderPolicy) -> dict[str, object]:
    """The values of ``CYCLE_FIELDS`` for a cycle (re)started at ``now``."""
    return {
        "reminder_cycle_started_at": now,
        "reminder_count": 0,
        "next_reminder_at": policy.due_at(now, 0, now=now),
    }


def start_cycle(contract: Contract, *, now: datetime, policy: ReminderPolicy) -> None:
    """(Re)start a contract's reminders from ``now`` (the invitation, or a resend)."""
    for name, value in cycle_start(now=now, policy=policy).items():
        setattr(contract, name, value)


def stop_reminders(contract: Contract) -> None:
    """No more reminders: signed, cancelled or rejected."""
    contract.next_reminder_at = None


class ReminderSweep(SQLModel, table=True):
    """One reminder sweep and what it did (the last ones show in ops status)."""

    __tablename__ = "reminder_sweeps"

    id: int | None = Field(default=None, primary_key=True)
    started_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False, index=True)
    )
    #: The time the sweep acted as of (``reminders run --now`` moves it).
    as_of: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    claimed: int = 0
    postponed: int = 0
    lost_races: int = 0
    codes_renewed: int = 0
    redriven: int = 0
    error: str | None = Field(default=None, max_length=1000)


@dataclass
class SweepResult:
    """What one sweep did."""

    claimed: list[int] = field(default_factory=list)
    postponed: int = 0
    lost_races: int = 0
    codes_renewed: int = 0


def _claim(session: Session, contract: Contract, *, now: datetime, policy: ReminderPolicy) -> bool:
    """Count the reminder and schedule the next one, in one statement guarded by the count read."""
    assert contract.reminder_cycle_started_at is not None
    count = contract.reminder_count + 1
    table = table_of(Contract)
    claimed = session.execute(
        update(table)
        .where(
            table.c.id == contract.id,
            table.c.status == ContractStatus.SENT.value,
            table.c.reminder_count == contract.reminder_count,
            table.c.next_reminder_at == contract.next_reminder_at,
        )
        .values(
            reminder_count=count,
            next_reminder_at=policy.due_at(contract.reminder_cycle_started_at, count, now=now),
            updated_at=now,
        )
    )
    return affected_rows(claimed) == 1


def _postpone(session: Session, contract: Contract, *, now: datetime, policy: ReminderPolicy) -> bool:
    table = table_of(Contract)
    moved = session.execute(
        update(table)
        .where(
            table.c.id == contract.id,
            table.c.reminder_count == contract.reminder_count,
            table.c.next_reminder_at == contract.next_reminder_at,
        )
        .values(next_reminder_at=policy.next_in_window(now))
    )
    return affected_rows(moved) == 1


def _codes_for_reminders(
    session: Session,
    contracts: list[Contract],
    *,
    now: datetime,
    codes: AccessCodePolicy,
    max_failed_attempts: int | None,
    renewals: Mapping[int, Mapping[str, object]],
) -> list[tuple[bool, bool]]:
    """For each contract: whether its reminder carries codes, and whether they were renewed for it.

    A client who never logged in gets the current code again while it is
    usable, and a new one (the old one stops working) once it has expired or
    was locked by ``max_failed_attempts`` wrong attempts: a reminder carrying a
    code that cannot work would leave the client stuck. The accounts
    are read and locked in one statement per 500, in id order (two sweeps lock
    them in the same order); a client with two contracts due is renewed once.
    A renewal takes its code from ``renewals`` (hashed before the transaction,
    see ``accounts_to_renew``), else hashes one here.
    """
    account_ids = sorted({contract.account_id for contract in contracts if contract.account_id is not None})
    accounts: dict[int, Account] = {}
    for ids in chunks(account_ids):
        rows = session.exec(
            select(Account)
            .where(col(Account.id).in_(ids))
            .order_by(col(Account.id))
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        accounts.update((account.id, account) for account in rows if account.id is not None)
    found: list[tuple[bool, bool]] = []
    for contract in contracts:
        account = accounts.get(contract.account_id) if contract.account_id is not None else None
        if account is None or not needs_access_code(account):
            found.append((False, False))
            continue
        expired = account.access_code_expires_at is None or account.access_code_expires_at <= now
        locked = (
            max_failed_attempts is not None and account.access_code_failed_attempts >= max_failed_attempts
        )
        renewed = expired or locked
        if renewed:
            prepared = renewals.get(account.id) if account.id is not None else None
            if prepared is not None:
                apply_access_code(account, prepared)
            else:
                issue_access_code(account, policy=codes, now=now)
            session.add(account)
        found.append((True, renewed))
    return found


def _next_reminder_steps(session: Session, contract_ids: list[str]) -> dict[str, int]:
    """The step of each contract's new reminder email: after the reminders of earlier cycles too.

    A resend restarts the count at 0, yet the email's key (kind, contract,
    recipient, step) must be new, or the reminder would find the previous
    cycle's email already sent and never go out. The claims just made hold the
    contract rows, so no other sweep adds a reminder to them meanwhile.
    """
    last: dict[str, int] = {}
    for ids in chunks(sorted(contract_ids)):
        rows = session.exec(
            select(EmailDelivery.contract_id, func.max(EmailDelivery.step))
            .where(EmailDelivery.kind == EmailKind.REMINDER.value, col(EmailDelivery.contract_id).in_(ids))
            .group_by(col(EmailDelivery.contract_id))
        )
        last.update((contract_id, step) for contract_id, step in rows if step is not None)
    return {contract_id: last.get(contract_id, 0) + 1 for contract_id in contract_ids}


def accounts_to_renew(
    session: Session, *, now: datetime, limit: int, max_failed_attempts: int | None
) -> list[int]:
    """The accounts whose code the next ``limit`` due reminders would renew, in id order.

    Read before the sweep's transaction, so that their codes are hashed outside it
    (tens of milliseconds each): inside, the claimed contracts and their accounts
    stayed locked meanwhile, and on SQLite the whole database. A contract claimed
    by another sweep meanwhile only costs a hash that is not used.
    """
    due = due_reminders(now, limit).subquery()
    renewal = col(Account.access_code_expires_at).is_(None) | (col(Account.access_code_expires_at) <= now)
    if max_failed_attempts is not None:
        renewal = renewal | (col(Account.access_code_failed_attempts) >= max_failed_attempts)
    rows = session.exec(
        select(Account.id)
        .where(col(Account.id).in_(select(due.c.account_id)), col(Account.first_login_at).is_(None), renewal)
        .order_by(col(Account.id))
    )
    return [account_id for account_id in rows if account_id is not None]


def due_reminders(now: datetime, limit: int) -> SelectOfScalar[Contract]:
    """The contracts whose reminder is due at ``now``, oldest first (see ix_contracts_due_reminders)."""
    return (
        select(Contract)
        .where(col(Contract.next_reminder_at) <= now, Contract.status == ContractStatus.SENT.value)
        .order_by(col(Contract.next_reminder_at))
        .limit(limit)
    )


def sweep_due_reminders(
    session: Session,
    *,
    now: datetime,
    policy: ReminderPolicy,
    codes: AccessCodePolicy,
    limit: int,
    max_failed_attempts: int | None = None,
    renewals: Mapping[int, Mapping[str, object]] | None = None,
) -> SweepResult:
    """Claim up to ``limit`` due reminders and record their emails (the caller commits, then enqueues).

    ``renewals``: new codes' account columns by account id, hashed before this
    transaction (``accounts_to_renew``); a renewal not among them is hashed here.

    Due contracts are found through the index on (``status``,
    ``next_reminder_at``), and ``next_reminder_at`` is only set while a contract
    waits for a reminder: the cost follows the number of due contracts, not the
    size of the table (``make bench`` measures it).
    """
    result = SweepResult()
    due = session.exec(due_reminders(now, limit)).all()
    if not policy.in_window(now):
        # Due outside the window (the sweep ran late): wait for the opening.
        for contract in due:
            if _postpone(session, contract, now=now, policy=policy):
                result.postponed += 1
        return result
    # Each claim is its own guarded UPDATE: that is what makes a reminder go out
    # once however many sweeps run. What follows a claim is done for the whole
    # batch at once (accounts, steps, email rows), a few statements per batch.
    claimed = [contract for contract in due if _claim(session, contract, now=now, policy=policy)]
    result.lost_races = len(due) - len(claimed)
    if not claimed:
        return result
    codes_carried = _codes_for_reminders(
        session,
        claimed,
        now=now,
        codes=codes,
        max_failed_attempts=max_failed_attempts,
        renewals=renewals or {},
    )
    result.codes_renewed = sum(renewed for _, renewed in codes_carried)
    steps = _next_reminder_steps(session, [contract.id for contract in claimed])
    result.claimed = add_deliveries(
        session,
        kind=EmailKind.REMINDER,
        deliveries=[
            NewDelivery(
                contract_id=contract.id,
                recipient=contract.email,
                recipient_name=None,
                locale=contract.locale,
                step=steps[contract.id],
                includes_access_code=carries_code,
            )
            for contract, (carries_code, _) in zip(claimed, codes_carried, strict=True)
        ],
    )
    return result


def stale_pending_deliveries(session: Session, *, older_than: datetime, limit: int) -> list[int]:
    """Pending emails untouched since ``older_than`` with no send in flight: their message was lost."""
    rows = session.exec(
        select(EmailDelivery.id)
        .where(
            EmailDelivery.status == DeliveryStatus.PENDING.value,
            col(EmailDelivery.updated_at) < older_than,
            col(EmailDelivery.lease_expires_at).is_(None)
            | (col(EmailDelivery.lease_expires_at) < older_than),
        )
        .order_by(col(EmailDelivery.updated_at))
        .limit(limit)
    )
    return [row for row in rows if row is not None]
