"""Contracts sent for signature, and their lifecycle."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlmodel import JSON, Column, Field, Index, SQLModel

from models.account import COMPANY_NAME_MAX_LENGTH, EMAIL_MAX_LENGTH
from models.types import UTCDateTime, utc_now
from models.workspace import IDENTIFIER_MAX_LENGTH


class ContractStatus(StrEnum):
    """Where a contract is in its journey."""

    QUEUED = "queued"
    SENT = "sent"
    REJECTED = "rejected"
    SIGNED = "signed"
    CANCELLED = "cancelled"


class LeadSource(StrEnum):
    """Where the lead came from, declared by the manager (the marketplace bills on bap)."""

    BAP = "bap"
    NETWORK = "network"
    OTHER = "other"


class Contract(SQLModel, table=True):
    """One contract, keyed by the producer's contract id."""

    __tablename__ = "contracts"
    __table_args__ = (
        # The reminder sweep's due query: status = 'sent', next_reminder_at <= now,
        # oldest first. Without statistics (SQLite never gathers any here) a
        # planner given only single-column indexes takes the equality on status
        # and scans every sent contract; this one answers the whole query in order.
        Index("ix_contracts_due_reminders", "status", "next_reminder_at"),
        # The producer's check: an address's contracts still queued, earliest first
        # (rule 4's "first sent"); and any lookup by address alone. With single-column
        # indexes on email and status, a planner without statistics (SQLite always, a
        # PostgreSQL table not analyzed yet, as after a bulk import) took the one on
        # status and read every queued contract: each check cost as much as the backlog.
        Index("ix_contracts_queued_by_email", "email", "status", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=IDENTIFIER_MAX_LENGTH)
    status: str = Field(default=ContractStatus.QUEUED, max_length=16, index=True)
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, max_length=1000)
    #: SHA-256 of the canonical send_contract content: same id, other content = conflict.
    content_hash: str = Field(default="", max_length=64)
    workspace_id: str = Field(default="", max_length=IDENTIFIER_MAX_LENGTH, index=True)
    resource_group_id: str | None = Field(default=None, max_length=IDENTIFIER_MAX_LENGTH)
    email: str = Field(default="", max_length=EMAIL_MAX_LENGTH)
    company_name: str = Field(default="", max_length=COMPANY_NAME_MAX_LENGTH)
    lead_source: str = Field(default="", max_length=16, index=True)
    title: str | None = Field(default=None, max_length=200)
    locale: str = Field(default="fr", max_length=8)
    #: ``[{"id": ..., "title": ...}]`` as sent.
    sections: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    #: ``[{"email": ..., "name": ...}]``: the managers told when the client signs.
    signatories: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    account_id: int | None = Field(default=None, foreign_key="accounts.id")
    #: Whether this contract's invitation carries temporary access codes.
    access_code_issued: bool = Field(default=False)
    created_at: datetime = Field(default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False))
    sent_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    signed_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    #: The client's legal information, recorded at signature.
    legal_name: str | None = Field(default=None, max_length=COMPANY_NAME_MAX_LENGTH)
    registration_number: str | None = Field(default=None, max_length=64)
    signer_name: str | None = Field(default=None, max_length=200)
    #: Reminders: when the cycle started (invitation or resend), how many were
    #: sent, and when the next is due (None when none is, which keeps the index small).
    reminder_cycle_started_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    reminder_count: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    next_reminder_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), index=True))
    cancelled_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    cancel_reason: str | None = Field(default=None, max_length=500)

    def section_ids(self) -> list[str]:
        """The ids of the sections sent, in order."""
        return [str(section["id"]) for section in self.sections]
