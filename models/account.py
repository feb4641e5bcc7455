"""Accounts: one email address, bound to exactly one company legal name."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Column, Field, SQLModel

from models.types import UTCDateTime, utc_now

#: Longest address RFC 5321 lets through a mail server.
EMAIL_MAX_LENGTH = 254

#: Longest company legal name accepted, in characters.
COMPANY_NAME_MAX_LENGTH = 200


class Account(SQLModel, table=True):
    """A client's account, created by the first contract sent to its email."""

    __tablename__ = "accounts"

    id: int | None = Field(default=None, primary_key=True)
    #: Normalised address (see ``models.binding.normalize_email``); unique.
    email: str = Field(max_length=EMAIL_MAX_LENGTH, unique=True, index=True)
    #: The legal name of the very first contract to this address (trimmed, NFC).
    company_name: str = Field(max_length=COMPANY_NAME_MAX_LENGTH)
    created_at: datetime = Field(default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False))
    #: None until the client has logged in once: such an account gets access codes.
    first_login_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    #: The long-term password's argon2id hash, set at first login.
    password_hash: str | None = Field(default=None, max_length=255)
    #: The current temporary password's argon2id hash; never the plaintext.
    access_code_hash: str | None = Field(default=None, max_length=255)
    #: Per-issue nonce from which the emailed code is re-derived with SECRET_KEY.
    access_code_nonce: str | None = Field(default=None, max_length=64)
    access_code_issued_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    access_code_expires_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    access_code_used_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    access_code_failed_attempts: int = Field(default=0)
