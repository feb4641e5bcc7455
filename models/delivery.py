"""Email deliveries: one row per email, sent at most once once recorded as sent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import Connection, bindparam, or_, update
from sqlmodel import Column, Field, Index, Session, SQLModel, UniqueConstraint, col, select

from models.account import EMAIL_MAX_LENGTH
from models.types import UTCDateTime, utc_now
from models.upsert import (
    affected_rows,
    chunks,
    insert_many_ignoring_conflict,
    insert_returning,
    insert_returning_row,
    table_of,
)
from models.workspace import IDENTIFIER_MAX_LENGTH


class EmailKind(StrEnum):
    """What an email is for; also the template name."""

    INVITATION = "invitation"
    SIGNED_NOTIFICATION = "signed_notification"
    REMINDER = "reminder"


class DeliveryStatus(StrEnum):
    """Where one email is."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    #: Not sent because the contract no longer wants it (cancelled, or signed before a reminder).
    CANCELLED = "cancelled"


def idempotency_key(kind: str, contract_id: str, recipient: str, step: int) -> str:
    """A delivery's key: ``kind:contract_id:recipient:step``, unique across all deliveries."""
    return f"{kind}:{contract_id}:{recipient}:{step}"


class EmailDelivery(SQLModel, table=True):
    """One email to one recipient, unique by (kind, contract, recipient, step)."""

    __tablename__ = "email_deliveries"
    __table_args__ = (
        UniqueConstraint("kind", "contract_id", "recipient", "step", name="uq_email_delivery_key"),
        # A contract's pending emails (every signed event, resend and cancellation asks),
        # and any lookup by contract alone. With single-column indexes on contract_id and
        # status, a planner without statistics (SQLite always) took the one on status and
        # read every pending email: a backlog (a provider outage) slowed each of them.
        Index("ix_email_deliveries_pending_by_contract", "contract_id", "status"),
        # The emails sent in the last hour and day, counted by ``status`` and at every
        # scrape of the metrics: a range of this index, not every email ever sent (the one
        # on status alone read them all, ten times slower at 200,000). Its first column
        # serves the lookups by status alone (pending, failed).
        Index("ix_email_deliveries_status_sent_at", "status", "sent_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32)
    contract_id: str = Field(max_length=IDENTIFIER_MAX_LENGTH, foreign_key="contracts.id")
    recipient: str = Field(max_length=EMAIL_MAX_LENGTH)
    recipient_name: str | None = Field(default=None, max_length=200)
    #: 0 for the first email of its kind; resends and reminders count up.
    step: int = Field(default=0)
    locale: str = Field(default="fr", max_length=8)
    #: Whether the email carries the account's current temporary password.
    includes_access_code: bool = Field(default=False)
    status: str = Field(default=DeliveryStatus.PENDING, max_length=16)
    attempts: int = Field(default=0)
    provider_message_id: str | None = Field(default=None, max_length=255)
    last_error: str | None = Field(default=None, max_length=1000)
    #: Until when the attempt that claimed this delivery may send it.
    lease_expires_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    created_at: datetime = Field(default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False))
    sent_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))

    @property
    def idempotency_key(self) -> str:
        """``kind:contract_id:recipient:step``, unique across all deliveries."""
        return idempotency_key(self.kind, self.contract_id, self.recipient, self.step)


class Claim(StrEnum):
    """What an attempt to take a delivery for sending found."""

    CLAIMED = "claimed"
    ALREADY_SENT = "already_sent"
    ALREADY_FAILED = "already_failed"
    CANCELLED = "cancelled"
    LEASED = "leased"
    MISSING = "missing"


#: Longest error text kept on a delivery.
LAST_ERROR_MAX_LENGTH = 1000


@dataclass(frozen=True, kw_only=True)
class NewDelivery:
    """One email to record (``add_delivery``, ``add_deliveries``, ``add_claimed_delivery``)."""

    contract_id: str
    recipient: str
    recipient_name: str | None
    locale: str
    step: int = 0
    includes_access_code: bool = False


#: A delivery's idempotency key, as the unique constraint's columns.
_KEY_COLUMNS = ["kind", "contract_id", "recipient", "step"]


def _pending_row(kind: EmailKind, delivery: NewDelivery, *, now: datetime) -> dict[str, object]:
    """The row of a new email, pending and never attempted."""
    return {
        "kind": kind.value,
        "contract_id": delivery.contract_id,
        "recipient": delivery.recipient,
        "recipient_name": delivery.recipient_name,
        "step": delivery.step,
        "locale": delivery.locale,
        "includes_access_code": delivery.includes_access_code,
        "status": DeliveryStatus.PENDING.value,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }


def add_delivery(session: Session, *, kind: EmailKind, delivery: NewDelivery) -> int:
    """Record one email (idempotent on its key) and return its id.

    A new email takes one statement (its id comes back from the insert); one
    already recorded is looked up by its key.
    """
    inserted = insert_returning(
        session,
        EmailDelivery,
        _pending_row(kind, delivery, now=utc_now()),
        conflict_columns=_KEY_COLUMNS,
        returning="id",
    )
    if inserted is not None:
        return int(inserted)
    delivery_id = session.exec(
        select(EmailDelivery.id).where(
            EmailDelivery.kind == kind.value,
            EmailDelivery.contract_id == delivery.contract_id,
            EmailDelivery.recipient == delivery.recipient,
            EmailDelivery.step == delivery.step,
        )
    ).one()
    assert delivery_id is not None
    return delivery_id


def add_deliveries(session: Session, *, kind: EmailKind, deliveries: Sequence[NewDelivery]) -> list[int]:
    """Record many emails of one kind (each idempotent on its key) and return their ids, in order.

    One executemany, then one SELECT per 500 contracts, where ``add_delivery``
    takes two statements per email: a reminder sweep records a batch at a time.
    """
    if not deliveries:
        return []
    now = utc_now()
    insert_many_ignoring_conflict(
        session,
        EmailDelivery,
        [_pending_row(kind, delivery, now=now) for delivery in deliveries],
        conflict_columns=_KEY_COLUMNS,
    )
    ids: dict[tuple[str, str, int], int] = {}
    for contract_ids in chunks(sorted({delivery.contract_id for delivery in deliveries})):
        rows = session.exec(
            select(
                EmailDelivery.id, EmailDelivery.contract_id, EmailDelivery.recipient, EmailDelivery.step
            ).where(EmailDelivery.kind == kind.value, col(EmailDelivery.contract_id).in_(contract_ids))
        )
        for delivery_id, contract_id, recipient, step in rows:
            if delivery_id is not None:
                ids[(contract_id, recipient, step)] = delivery_id
    return [ids[(delivery.contract_id, delivery.recipient, delivery.step)] for delivery in deliveries]


def pending_delivery_ids(session: Session, contract_id: str, kind: EmailKind) -> list[int]:
    """Deliveries of a contract still to be sent (re-enqueued when a message is redelivered)."""
    rows = session.exec(
        select(EmailDelivery.id).where(
            EmailDelivery.contract_id == contract_id,
            EmailDelivery.kind == kind.value,
            EmailDelivery.status == DeliveryStatus.PENDING.value,
        )
    )
    return [row for row in rows if row is not None]


@dataclass(frozen=True, kw_only=True)
class DeliveryRow:
    """A delivery as one send attempt reads it (plain values, no ORM state)."""

    id: int
    kind: str
    contract_id: str
    recipient: str
    recipient_name: str | None
    step: int
    locale: str
    includes_access_code: bool
    status: str
    lease_expires_at: datetime | None

    @property
    def idempotency_key(self) -> str:
        """``kind:contract_id:recipient:step``, unique across all deliveries."""
        return idempotency_key(self.kind, self.contract_id, self.recipient, self.step)


_deliveries = table_of(EmailDelivery)
_ROW_NAMES = tuple(field.name for field in fields(DeliveryRow))
_row_columns = [_deliveries.c[name] for name in _ROW_NAMES]

# Built once: a statement object reused keeps its SQLAlchemy cache key, so each
# execution skips building and keying the statement (the hot path runs these
# for every email).
_CLAIM = (
    update(_deliveries)
    .where(
        _deliveries.c.id == bindparam("delivery_id"),
        _deliveries.c.status == DeliveryStatus.PENDING.value,
        or_(_deliveries.c.lease_expires_at.is_(None), _deliveries.c.lease_expires_at < bindparam("now")),
    )
    .values(
        attempts=_deliveries.c.attempts + 1,
        lease_expires_at=bindparam("lease_until"),
        updated_at=bindparam("claimed_at"),
    )
    .returning(*_row_columns)
)
_READ = select(*_row_columns).where(_deliveries.c.id == bindparam("delivery_id"))
_MARK_SENT = (
    update(_deliveries)
    .where(_deliveries.c.id == bindparam("delivery_id"))
    .values(
        status=DeliveryStatus.SENT.value,
        provider_message_id=bindparam("message_id"),
        lease_expires_at=None,
        sent_at=bindparam("sent_time"),
        updated_at=bindparam("sent_time"),
        last_error=None,
    )
)


def add_claimed_delivery(
    session: Session, *, kind: EmailKind, delivery: NewDelivery, now: datetime, lease: timedelta
) -> DeliveryRow | None:
    """Record a new email already claimed for its first attempt; None if it is recorded already.

    What ``add_delivery`` then ``claim_delivery`` do in two statements, in one:
    for an email its caller sends as soon as the transaction commits. The row is
    inserted pending, its attempt counted and its lease taken, as the claim
    would leave it. An email already recorded is left as it is, for the caller
    to claim as usual.
    """
    row = insert_returning_row(
        session,
        EmailDelivery,
        {**_pending_row(kind, delivery, now=now), "attempts": 1, "lease_expires_at": now + lease},
        conflict_columns=_KEY_COLUMNS,
        returning=_ROW_NAMES,
    )
    return None if row is None else DeliveryRow(**row._mapping)


def lease_remaining(delivery: DeliveryRow, *, now: datetime) -> timedelta:
    """How long the current holder of a delivery's lease may still keep it."""
    expires = delivery.lease_expires_at
    return max(expires - now, timedelta(0)) if expires is not None else timedelta(0)


def claim_delivery(
    session: Session, delivery_id: int, *, now: datetime, lease: timedelta
) -> tuple[Claim, DeliveryRow | None]:
    """Take a pending delivery for one send attempt, in one statement (the caller commits).

    Returns what the claim found and the delivery as it is now (None if missing):
    the UPDATE returns the claimed row, so a claim is one round trip.

    The lease keeps a concurrent duplicate message from sending the same email
    while this attempt is in flight; it expires on its own if the attempt dies.
    """
    claimed = (
        session.connection()
        .execute(
            _CLAIM,
            {"delivery_id": delivery_id, "now": now, "lease_until": now + lease, "claimed_at": now},
        )
        .first()
    )
    if claimed is not None:
        return Claim.CLAIMED, DeliveryRow(**claimed._mapping)
    found = session.connection().execute(_READ, {"delivery_id": delivery_id}).first()
    if found is None:
        return Claim.MISSING, None
    delivery = DeliveryRow(**found._mapping)
    claims = {
        DeliveryStatus.SENT: Claim.ALREADY_SENT,
        DeliveryStatus.FAILED: Claim.ALREADY_FAILED,
        DeliveryStatus.CANCELLED: Claim.CANCELLED,
    }
    return claims.get(DeliveryStatus(delivery.status), Claim.LEASED), delivery


def mark_sent(connection: Connection, delivery_id: int, *, provider_message_id: str, now: datetime) -> None:
    """Record the provider's acceptance; from now on the email is never sent again."""
    connection.execute(
        _MARK_SENT,
        {"delivery_id": delivery_id, "message_id": provider_message_id[:255], "sent_time": now},
    )


def record_attempt_error(
    session: Session, delivery_id: int, *, error: str, now: datetime, permanent: bool
) -> bool:
    """Keep the error and free the lease; a permanent error fails the delivery for good.

    Returns whether the delivery was pending (so this call changed it).
    """
    table = table_of(EmailDelivery)
    values: dict[str, object] = {
        "last_error": error[:LAST_ERROR_MAX_LENGTH],
        "lease_expires_at": None,
        "updated_at": now,
    }
    if permanent:
        values["status"] = DeliveryStatus.FAILED.value
    result = session.execute(
        update(table)
        .where(table.c.id == delivery_id, table.c.status == DeliveryStatus.PENDING.value)
        .values(**values)
    )
    return affected_rows(result) == 1


def reopen_delivery(session: Session, delivery_id: int) -> bool:
    """A failed delivery becomes pending again (an operator retries it); sent stays sent.

    Returns whether it was failed (so this call reopened it).
    """
    table = table_of(EmailDelivery)
    result = session.execute(
        update(table)
        .where(table.c.id == delivery_id, table.c.status == DeliveryStatus.FAILED.value)
        .values(status=DeliveryStatus.PENDING.value, lease_expires_at=None, updated_at=utc_now())
    )
    return affected_rows(result) == 1


def undo_reopen(session: Session, delivery_id: int) -> None:
    """``reopen_delivery`` taken back: its retry could not be enqueued.

    Only a delivery no attempt has taken since (pending, no lease): left pending,
    the reminder sweep's re-drive of lost messages would send it on its own,
    while its dead letter still reads dead.
    """
    table = table_of(EmailDelivery)
    session.execute(
        update(table)
        .where(
            table.c.id == delivery_id,
            table.c.status == DeliveryStatus.PENDING.value,
            table.c.lease_expires_at.is_(None),
        )
        .values(status=DeliveryStatus.FAILED.value, updated_at=utc_now())
    )


def cancel_delivery(session: Session, delivery_id: int, *, reason: str, now: datetime) -> bool:
    """A pending email that must not go out any more (the contract was cancelled or signed).

    Returns whether it was pending (so it is cancelled now, by this call).
    """
    table = table_of(EmailDelivery)
    result = session.execute(
        update(table)
        .where(table.c.id == delivery_id, table.c.status == DeliveryStatus.PENDING.value)
        .values(
            status=DeliveryStatus.CANCELLED.value, last_error=reason, lease_expires_at=None, updated_at=now
        )
    )
    return affected_rows(result) == 1


def touch_deliveries(session: Session, delivery_ids: list[int], *, now: datetime) -> None:
    """Mark pending emails as just enqueued again (so a sweep does not re-drive them twice)."""
    table = table_of(EmailDelivery)
    for ids in chunks(delivery_ids):
        session.execute(
            update(table)
            .where(table.c.id.in_(ids), table.c.status == DeliveryStatus.PENDING.value)
            .values(updated_at=now)
        )
