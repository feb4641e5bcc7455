"""Rule 4, one email, one company: an address is bound to the legal name of the
first contract sent to it, compared case-sensitively after trimming and NFC."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import bindparam, sql
from sqlmodel import Session, select

from models.account import COMPANY_NAME_MAX_LENGTH, Account
from models.errors import EmailBoundToOtherCompany
from models.text import clean_text
from models.types import utc_now
from models.upsert import insert_returning, table_of


def normalize_company_name(value: str) -> str:
    """Trim surrounding whitespace and apply NFC; letter case is never folded."""
    return clean_text(value, max_length=COMPANY_NAME_MAX_LENGTH, what="company name")


def normalize_email(value: str) -> str:
    """Validate an address; keep the local part exactly, lower-case the domain.

    Raises ``ValueError`` with the validator's explanation when it is not an address.
    """
    value = value.strip()
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None
    # email-validator lower-cases the domain (and converts IDNA) but keeps the
    # local part as typed, which is what rule 4's comparison needs.
    return f"{result.local_part}@{result.domain}"


#: The refusal for a name that differs from the bound one only by letter case or
#: spacing. Like the other, it quotes no name: the sender knows theirs.
CASE_OR_SPACING_MESSAGE = (
    "This email address is already used for this company name written differently: "
    "the names differ only by letter case or spacing. Use exactly the same legal "
    "name as in the first contract sent to this address."
)

#: The refusal for any other name.
OTHER_COMPANY_MESSAGE = (
    "This email address is already used for another company. An email address "
    "belongs to one company only: use a different email address for this company."
)


def _loosely(name: str) -> str:
    # A missing or extra space is a spacing difference too ("DupontSARL").
    return "".join(name.split()).casefold()


def check_binding(*, bound_company: str | None, requested_company: str) -> None:
    """Refuse ``requested_company`` unless it is exactly the bound name.

    ``bound_company`` is None for an address not bound yet, which accepts any
    name. The refusal never reveals the bound name; when the two differ only by
    letter case or spacing it says so, since that is the usual mistake.

    Known and unknown addresses go through the same steps (an unknown one is
    compared with the requested name itself), so the time this takes does not
    tell them apart.
    """
    bound = requested_company if bound_company is None else bound_company
    # Both comparisons always run: no early return for the usual case.
    same = hmac.compare_digest(bound.encode(), requested_company.encode())
    same_loosely = hmac.compare_digest(_loosely(bound).encode(), _loosely(requested_company).encode())
    if same:
        return
    if same_loosely:
        raise EmailBoundToOtherCompany(CASE_OR_SPACING_MESSAGE)
    raise EmailBoundToOtherCompany(OTHER_COMPANY_MESSAGE)


def find_account(session: Session, email: str) -> Account | None:
    """The account of a normalised address, if any."""
    return session.exec(select(Account).where(Account.email == email)).first()


@dataclass(frozen=True)
class BoundAccount:
    """An account as binding reads it: its id, its bound name, when the client first logged in."""

    id: int
    company_name: str
    first_login_at: datetime | None


# Built once: a reused statement keeps its cache key (every send_contract runs it).
# Plain values, not an ORM object: most sends are to accounts that need nothing more.
_ACCOUNTS = table_of(Account)
_ACCOUNT_FOR_UPDATE = (
    sql.select(_ACCOUNTS.c.id, _ACCOUNTS.c.company_name, _ACCOUNTS.c.first_login_at)
    .where(_ACCOUNTS.c.email == bindparam("email"))
    .with_for_update()
)


def bind_account(
    session: Session,
    *,
    email: str,
    company_name: str,
    new_account_fields: Callable[[], dict[str, object]] | None = None,
) -> tuple[BoundAccount, bool]:
    """Get or create the account of ``email`` bound to ``company_name``, locked for update.

    Returns the account and whether this call created it. An existing account
    (the usual case) takes one statement, and so does a new one: it is inserted
    with ``new_account_fields()`` (its access code) and its id comes back from
    the insert. Two transactions racing for the same new address both
    insert-or-ignore: the database's unique index lets exactly one win, and the
    loser then reads and compares the winner's name.
    """
    params = {"email": email}
    row: Any = session.connection().execute(_ACCOUNT_FOR_UPDATE, params).first()
    created = False
    if row is None:
        values = {"email": email, "company_name": company_name, "created_at": utc_now()}
        if new_account_fields is not None:
            values.update(new_account_fields())
        inserted = insert_returning(session, Account, values, conflict_columns=["email"], returning="id")
        created = inserted is not None
        if created:
            # Ours, inserted and locked by this transaction: not read back.
            row = (inserted, company_name, None)
        else:
            row = session.connection().execute(_ACCOUNT_FOR_UPDATE, params).one()
    # The statement's columns, in BoundAccount's order.
    account = BoundAccount(*row)
    check_binding(bound_company=account.company_name, requested_company=company_name)
    return account, created
