"""Dead letters: messages that failed for good, with the reason.

Dramatiq's own Redis dead-letter queue keeps the message but not why it failed,
and drops it after a week. This table keeps the reason until an operator retries
or purges the record; nothing expires from it on its own.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlmodel import JSON, Column, Field, Session, SQLModel, col, select

from models.delivery import EmailDelivery
from models.messages import delivery_ids_of
from models.types import UTCDateTime, utc_now
from models.upsert import insert_ignoring_conflict

#: Longest exception message kept, in characters.
ERROR_MESSAGE_MAX_LENGTH = 2000

#: Longest traceback kept, in characters.
TRACEBACK_MAX_LENGTH = 8000


#: Longest ids and names kept, in characters (the lengths of their columns below).
_NAME_LENGTHS = {
    "message_id": 64,
    "redis_message_id": 64,
    "queue_name": 128,
    "actor_name": 128,
    "contract_id": 128,
    "exception_type": 128,
}


def storable(text: str) -> str:
    """``text`` as every database stores it: PostgreSQL refuses NUL characters, so they are
    escaped; a lone surrogate (JSON's ``"\\ud800"``) cannot be encoded at all, so it is
    written as that escape."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def storable_json(value: Any) -> Any:
    """A message's arguments with every string, keys included, made ``storable``."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, list):
        return [storable_json(item) for item in value]
    if isinstance(value, dict):
        return {storable(str(key)): storable_json(item) for key, item in value.items()}
    return value


class DeadLetterStatus(StrEnum):
    """Whether a dead letter still waits for an operator."""

    DEAD = "dead"
    RETRIED = "retried"


class DeadLetter(SQLModel, table=True):
    """One message that failed for good (one row per Dramatiq message id)."""

    __tablename__ = "dead_letters"

    id: int | None = Field(default=None, primary_key=True)
    #: Dramatiq's message id: the same across retries of one message.
    message_id: str = Field(max_length=64, unique=True, index=True)
    #: The key of the copy in Redis's dead-letter queue (``{queue}.XQ``).
    redis_message_id: str | None = Field(default=None, max_length=64)
    queue_name: str = Field(max_length=128, index=True)
    actor_name: str = Field(max_length=128, index=True)
    contract_id: str | None = Field(default=None, max_length=128, index=True)
    #: The message's arguments as sent (payloads carry ids, never secrets).
    message_args: list[Any] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    message_kwargs: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    exception_type: str = Field(max_length=128)
    exception_message: str = Field(default="", max_length=ERROR_MESSAGE_MAX_LENGTH)
    traceback: str | None = Field(default=None, max_length=TRACEBACK_MAX_LENGTH)
    #: How many times the message was processed before it was given up.
    attempts: int = Field(default=1)
    first_failed_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    last_failed_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    status: str = Field(default=DeadLetterStatus.DEAD, max_length=16, index=True)
    #: How many times an operator sent it back to its queue.
    retry_count: int = Field(default=0)
    retried_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))


def _contract_of_deliveries(session: Session, fields: dict[str, Any]) -> str | None:
    """The contract of the first delivery an email message names (its payload names none)."""
    args = fields.get("message_args") or [None]
    delivery_ids = delivery_ids_of(str(fields.get("actor_name")), args[0])
    if not delivery_ids:
        return None
    return session.exec(select(EmailDelivery.contract_id).where(EmailDelivery.id == delivery_ids[0])).first()


def record_dead_letter(session: Session, *, overwrite: bool = True, **fields: Any) -> DeadLetter:
    """Insert or refresh the record of a message id (a retried message may die again).

    With ``overwrite=False`` an existing record is left as it is: what a sweep
    that only guesses the reason must do when the worker that knows it got there first.
    """
    if fields.get("contract_id") is None:
        fields["contract_id"] = _contract_of_deliveries(session, fields)
    message = storable(str(fields.get("exception_message", "")))
    fields["exception_message"] = message[:ERROR_MESSAGE_MAX_LENGTH]
    if fields.get("traceback"):
        fields["traceback"] = storable(str(fields["traceback"]))[-TRACEBACK_MAX_LENGTH:]
    # Names come from the message as written (an unknown actor's name is anything):
    # cut to their columns, or the record could not be filed at all.
    for name, length in _NAME_LENGTHS.items():
        if isinstance(fields.get(name), str):
            fields[name] = storable(fields[name])[:length]
    for name in ("message_args", "message_kwargs"):
        if name in fields:
            fields[name] = storable_json(fields[name])
    inserted = insert_ignoring_conflict(
        session,
        DeadLetter,
        {**fields, "status": DeadLetterStatus.DEAD.value},
        conflict_columns=["message_id"],
    )
    record = session.exec(
        select(DeadLetter).where(DeadLetter.message_id == fields["message_id"]).with_for_update()
    ).one()
    if not inserted and overwrite:
        # The first failure stays the first; everything else is the latest death.
        for name, value in fields.items():
            if name != "first_failed_at":
                setattr(record, name, value)
        record.status = DeadLetterStatus.DEAD
        session.add(record)
    return record


def find_dead_letters(
    session: Session,
    *,
    queue_name: str | None = None,
    actor_name: str | None = None,
    include_retried: bool = False,
    failed_before: datetime | None = None,
) -> list[DeadLetter]:
    """Dead letters, newest first, filtered as asked."""
    query = select(DeadLetter)
    if not include_retried:
        query = query.where(DeadLetter.status == DeadLetterStatus.DEAD.value)
    if queue_name:
        query = query.where(DeadLetter.queue_name == queue_name)
    if actor_name:
        query = query.where(DeadLetter.actor_name == actor_name)
    if failed_before is not None:
        query = query.where(col(DeadLetter.last_failed_at) < failed_before)
    return list(
        session.exec(query.order_by(col(DeadLetter.last_failed_at).desc(), col(DeadLetter.id).desc()))
    )


def mark_retried(session: Session, record: DeadLetter) -> None:
    """The operator sent the message back to its queue."""
    record.status = DeadLetterStatus.RETRIED
    record.retry_count += 1
    record.retried_at = utc_now()
    record.redis_message_id = None
    session.add(record)
