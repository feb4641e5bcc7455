"""Refused access codes that count against no usable code: one row per address, keyed by digest.

A wrong guess at a usable code is counted on its account (the lock-out). Every
other refusal (an address without an account, a locked, expired or spent code,
a code replaced meanwhile) is counted here instead, so that every refusal writes
one row and commits: a refusal that only read would answer faster, and that
difference would tell which addresses hold a usable code, or have an account at all.

The address is stored only as a keyed digest (HMAC-SHA256 with SECRET_KEY): the
table mostly holds addresses somebody typed that are nobody's account.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Column, Field, Session, SQLModel

from models.types import UTCDateTime
from models.upsert import affected_rows, table_of

#: Length of an address digest: SHA-256 in hexadecimal, in characters.
DIGEST_LENGTH = 64

#: How long a refusal row is kept after its last refusal (the housekeeping job purges older ones).
REFUSAL_RETENTION = timedelta(days=1)

#: Domain separation: the same key derives the access codes.
_DIGEST_LABEL = b"contract-dispatch/code-refusal/v1\x00"


class CodeRefusal(SQLModel, table=True):
    """Refusals of codes typed for one address, other than wrong guesses at a usable code."""

    __tablename__ = "access_code_refusals"

    #: ``address_digest`` of the address as typed (normalised when it is an address).
    address_digest: str = Field(primary_key=True, max_length=DIGEST_LENGTH)
    refusals: int = Field(default=0)
    last_refused_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))


def address_digest(address: str, *, key: bytes) -> str:
    """The keyed digest under which refusals for ``address`` are counted."""
    return hmac.new(key, _DIGEST_LABEL + address.encode(), hashlib.sha256).hexdigest()


@functools.cache
def _upsert(dialect: str) -> Any:
    # Built once per dialect: a reused statement keeps its cache key.
    table = table_of(CodeRefusal)
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c.address_digest],
        set_={
            "refusals": table.c.refusals + 1,
            "last_refused_at": statement.excluded.last_refused_at,
        },
    )


def record_refusal(session: Session, digest: str, *, now: datetime) -> None:
    """Count one refusal for the address of ``digest`` (one statement: insert or add one)."""
    statement = _upsert(session.get_bind().dialect.name)
    session.execute(statement, {"address_digest": digest, "refusals": 1, "last_refused_at": now})


def purge_refusals(session: Session, *, now: datetime) -> int:
    """Delete the rows whose last refusal is older than ``REFUSAL_RETENTION``; returns how many."""
    table = table_of(CodeRefusal)
    statement = delete(table).where(table.c.last_refused_at < now - REFUSAL_RETENTION)
    return affected_rows(session.execute(statement))
