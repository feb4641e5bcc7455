"""First login: a client proves an emailed access code and sets a long-term password.

The rules (ASVS 5.0 §6.4/§6.5, NIST SP 800-63B look-up secrets):

- a code works only for its account, only before its expiry, and only once:
  ``set_password`` consumes it; ``verify_code`` only checks it (a client may check
  a code, then choose a password, without the check using the code up);
- more than ``max_failed_attempts`` wrong codes lock the current code until a new
  one is issued (``issue_access_code`` resets the counter);
- the long-term password can never be (or contain) the code;
- every call runs exactly one argon2id verification, against a dummy hash with the
  same parameters when the email is unknown or has no usable code, and every
  refusal of a code is the same ``AccessCodeRefused``: neither the answer nor its
  timing tells whether the email exists, nor which of wrong, expired, used or
  locked applies (each distinction would be an oracle for somebody without the code);
- every refusal of a code writes one row and commits: a wrong guess at a usable
  code is counted on its account, any other refusal in ``models.code_refusal``
  (a refusal that only read would commit faster than one that counted);
- hashes made with lower costs than the current parameters are rehashed on use.

The expensive argon2id work runs outside any transaction; the decision and the
write then happen in one short transaction holding the account's row lock, and
only if the code verified is still the current one (same nonce). Two concurrent
uses of one code therefore serialise on the row: the second finds it used.
"""

from __future__ import annotations

import base64
import functools
import secrets
import unicodedata
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime

from argon2 import DEFAULT_HASH_LENGTH, DEFAULT_RANDOM_SALT_LENGTH
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.low_level import ARGON2_VERSION
from sqlalchemy import bindparam, update
from sqlmodel import Session, select

from models.access_codes import HashParameters, password_hasher
from models.account import EMAIL_MAX_LENGTH, Account
from models.binding import find_account, normalize_email
from models.code_refusal import address_digest, record_refusal
from models.errors import Rejected
from models.text import utf8_text
from models.upsert import table_of

#: Opens one transaction (commit on success, rollback on error), e.g. ``session_scope``.
Transaction = Callable[[], AbstractContextManager[Session]]

#: More wrong codes than this lock the current code (NIST: limit failed attempts).
DEFAULT_MAX_FAILED_ATTEMPTS = 5

#: Shortest long-term password accepted, in characters (ASVS 6.2.1 asks for 8; 12 recommended).
DEFAULT_PASSWORD_MIN_LENGTH = 12

#: Longest long-term password accepted, in characters (ASVS 6.2.9 asks to allow at least 64).
PASSWORD_MAX_LENGTH = 128

#: Longer inputs than this cannot be a code; they are cut before hashing (characters).
CODE_INPUT_MAX_LENGTH = 64

#: Characters a reader may add while typing a code: spaces and dashes between groups,
#: and the line break a code copied out of an email often brings along.
_CODE_SEPARATORS = str.maketrans("", "", " \t\r\n-_.")


class AccessCodeRefused(Rejected):
    """The email and access code do not match a usable code (the reason is not told)."""

    code = "access_code_refused"

    def __init__(self) -> None:
        super().__init__(
            "This email address and access code do not match a valid access code: the code "
            "may be wrong, expired, already used, or locked after too many attempts. Check "
            "the code in the latest email, or ask for a new one."
        )


class PasswordRefused(Rejected):
    """The new password breaks the password policy."""

    code = "password_refused"


class PasswordTooShort(PasswordRefused):
    """The new password is shorter than the minimum length."""

    code = "password_too_short"


class PasswordTooLong(PasswordRefused):
    """The new password is longer than ``PASSWORD_MAX_LENGTH``."""

    code = "password_too_long"


class PasswordIsAccessCode(PasswordRefused):
    """The new password is, or contains, the temporary access code."""

    code = "password_is_access_code"


@dataclass(frozen=True, kw_only=True)
class FirstLoginPolicy:
    """The hash costs, the failed-attempt limit and the password length bounds (characters)."""

    hash_parameters: HashParameters
    max_failed_attempts: int = DEFAULT_MAX_FAILED_ATTEMPTS
    password_min_length: int = DEFAULT_PASSWORD_MIN_LENGTH
    password_max_length: int = PASSWORD_MAX_LENGTH
    #: Keys the address digests of ``models.code_refusal`` (SECRET_KEY in the service).
    refusal_key: bytes = field(default=b"", repr=False)


def normalize_code(value: str) -> str:
    """A code as typed, compared as issued: NFKC, no spaces or dashes, upper case."""
    text = unicodedata.normalize("NFKC", utf8_text(value[: CODE_INPUT_MAX_LENGTH * 2]))
    return _code_form(text)[:CODE_INPUT_MAX_LENGTH]


def _code_form(text: str) -> str:
    """Text written the way codes are compared: no spaces or dashes, upper case."""
    return text.translate(_CODE_SEPARATORS).upper()


def normalize_password(value: str) -> str:
    """NFKC (NIST SP 800-63B §5.1.1.2): the same password typed anywhere hashes the same."""
    return unicodedata.normalize("NFKC", value)


def check_password_policy(password: str, *, code: str, policy: FirstLoginPolicy) -> str:
    """The normalised password, or ``PasswordRefused`` saying which rule it breaks."""
    if utf8_text(password) != password:
        raise PasswordRefused("The password is not text (it holds bytes that are not UTF-8).")
    normalized = normalize_password(password)
    if len(normalized) < policy.password_min_length:
        raise PasswordTooShort(f"The password must have at least {policy.password_min_length} characters.")
    if len(normalized) > policy.password_max_length:
        raise PasswordTooLong(f"The password must have at most {policy.password_max_length} characters.")
    typed_code = normalize_code(code)
    # Compared the way codes are: "abcd efgh jkmn" is still the code, wherever it
    # sits in the password (the whole password: a code's input bound does not apply).
    if typed_code and typed_code in _code_form(normalized):
        raise PasswordIsAccessCode(
            "The password must not be or contain the temporary access code: choose a new one."
        )
    return normalized


def _unpadded_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


@functools.cache
def _dummy_hash(parameters: HashParameters) -> str:
    """An encoded argon2id hash with these costs that no input matches.

    Verified against whenever there is no real hash, so that such a call costs
    the same argon2id work as a real one. Random salt and digest, written in
    argon2's encoding rather than computed: hashing here would make the first
    such call of every process (every ``verify-code`` command) one hash slower
    than a call for a real account, which would tell the two apart.
    """
    return (
        f"$argon2id$v={ARGON2_VERSION}$m={parameters.memory_kib},t={parameters.time_cost},"
        f"p={parameters.parallelism}${_unpadded_base64(secrets.token_bytes(DEFAULT_RANDOM_SALT_LENGTH))}"
        f"${_unpadded_base64(secrets.token_bytes(DEFAULT_HASH_LENGTH))}"
    )


def _hash_matches(encoded: str | None, secret: str, *, parameters: HashParameters) -> bool:
    """One argon2id verification, always: against ``encoded`` or the dummy hash."""
    hasher = password_hasher(parameters)
    try:
        return hasher.verify(encoded if encoded is not None else _dummy_hash(parameters), secret)
    except (VerificationError, InvalidHashError):
        return False


def _needs_rehash(encoded: str, parameters: HashParameters) -> bool:
    try:
        return password_hasher(parameters).check_needs_rehash(encoded)
    except (InvalidHashError, ValueError):
        return True


def _usable(account: Account, *, policy: FirstLoginPolicy, now: datetime) -> bool:
    """The account's current code may still be used (whether or not it was typed right)."""
    return (
        account.first_login_at is None
        and account.access_code_hash is not None
        and account.access_code_used_at is None
        and account.access_code_failed_attempts < policy.max_failed_attempts
        and account.access_code_expires_at is not None
        and account.access_code_expires_at > now
    )


@dataclass(frozen=True, kw_only=True)
class _Snapshot:
    """What the unlocked read saw: which code was checked, and whether it matched."""

    account_id: int | None
    #: What a refusal not counted on the account is counted under (``address_digest``).
    refusal_digest: str
    nonce: str | None
    encoded: str | None
    matched: bool
    #: Whether the code could be used when read.
    usable: bool

    @property
    def earns_work(self) -> bool:
        """A usable code typed right: only it gets argon2id work beyond the one verification.

        A locked or expired code then costs the same right or wrong, so timing cannot tell.
        """
        return self.matched and self.usable


def _address(email: str) -> str | None:
    """``email`` normalised as accounts store it; None when it is not an address."""
    try:
        # Undecodable bytes match nothing (answered like any unknown address), never fail the call.
        return normalize_email(utf8_text(email))
    except ValueError:
        return None


def _account_of(session: Session, address: str | None) -> Account | None:
    """The account of a normalised ``address``; None for none (``_address`` found no address)."""
    return find_account(session, address) if address is not None else None


def _check(
    transaction: Transaction, email: str, code: str, *, policy: FirstLoginPolicy, now: datetime
) -> _Snapshot:
    """Read the account (no lock), then run the one argon2id verification of the call.

    The verification runs after the read's transaction: on SQLite every
    transaction holds the one write lock from its start, and the other
    workers' transactions would wait through the hash.
    """
    address = _address(email)
    with transaction() as session:
        account = _account_of(session, address)
        account_id = account.id if account is not None else None
        encoded = account.access_code_hash if account is not None else None
        nonce = account.access_code_nonce if account is not None else None
        usable = account is not None and _usable(account, policy=policy, now=now)
    matched = _hash_matches(encoded, normalize_code(code), parameters=policy.hash_parameters)
    return _Snapshot(
        account_id=account_id,
        # Text that is no address is counted as typed (bounded: it is stored as a digest).
        refusal_digest=address_digest(address or email[:EMAIL_MAX_LENGTH], key=policy.refusal_key),
        nonce=nonce,
        encoded=encoded,
        matched=matched and encoded is not None,
        usable=usable,
    )


def _locked(
    session: Session, snapshot: _Snapshot, *, policy: FirstLoginPolicy, now: datetime
) -> Account | None:
    """The account the snapshot saw, locked for update, if its code is still the usable one checked."""
    # The same query runs for an unknown email (no row), so both cost one round trip.
    account = session.exec(
        select(Account).where(Account.id == (snapshot.account_id or 0)).with_for_update()
    ).first()
    if account is None or account.access_code_nonce != snapshot.nonce:
        # A new code was issued meanwhile: this answer was about the old one.
        return None
    if not _usable(account, policy=policy, now=now):
        return None
    return account


# Built once: a reused statement keeps its cache key.
_COUNT_FAILED_ATTEMPT = (
    update(table_of(Account))
    .where(table_of(Account).c.id == bindparam("account_id"))
    .values(access_code_failed_attempts=table_of(Account).c.access_code_failed_attempts + 1)
)


def _count_refusal(session: Session, account: Account | None, snapshot: _Snapshot, *, now: datetime) -> None:
    """One write for every refusal: on the usable code's account, else under the address's digest."""
    if account is not None:
        # One statement, as record_refusal is: the ORM's flush would cost more.
        session.execute(_COUNT_FAILED_ATTEMPT, {"account_id": account.id})
    else:
        record_refusal(session, snapshot.refusal_digest, now=now)


def verify_code(
    transaction: Transaction, email: str, code: str, *, policy: FirstLoginPolicy, now: datetime
) -> bool:
    """Whether ``code`` is the usable code of ``email``; a wrong code counts as a failed attempt."""
    snapshot = _check(transaction, email, code, policy=policy, now=now)
    rehashed = _rehash(snapshot, code, policy=policy)
    with transaction() as session:
        account = _locked(session, snapshot, policy=policy, now=now)
        if account is None or not snapshot.matched:
            _count_refusal(session, account, snapshot, now=now)
            return False
        if rehashed is not None:
            account.access_code_hash = rehashed
            session.add(account)
        return True


def set_password(
    transaction: Transaction,
    email: str,
    code: str,
    new_password: str,
    *,
    policy: FirstLoginPolicy,
    now: datetime,
) -> None:
    """Consume the code of ``email`` and store ``new_password`` as its argon2id hash.

    Raises ``PasswordRefused`` (nothing checked or counted) when the password breaks
    the policy, and ``AccessCodeRefused`` when the code is not usable.
    """
    password = check_password_policy(new_password, code=code, policy=policy)
    snapshot = _check(transaction, email, code, policy=policy, now=now)
    # Hashed before the row is locked: the lock is held for a few statements only.
    password_hash = password_hasher(policy.hash_parameters).hash(password) if snapshot.earns_work else None
    with transaction() as session:
        account = _locked(session, snapshot, policy=policy, now=now)
        if account is None or not snapshot.matched or password_hash is None:
            # Counted, and committed: the refusal is raised after the block.
            _count_refusal(session, account, snapshot, now=now)
            refused = True
        else:
            refused = False
            _consume(account, password_hash=password_hash, now=now)
            session.add(account)
    if refused:
        raise AccessCodeRefused()


def _consume(account: Account, *, password_hash: str, now: datetime) -> None:
    """Spend the code and record the long-term password: the first login is done."""
    account.password_hash = password_hash
    account.access_code_used_at = now
    # The code is spent: its hash has no further use.
    account.access_code_hash = None
    # First login done: reminders and new contracts stop issuing codes.
    account.first_login_at = now


def verify_password(transaction: Transaction, email: str, password: str, *, policy: FirstLoginPolicy) -> bool:
    """Whether ``password`` is the long-term password of ``email``; rehashes a weaker hash.

    Like the codes, an unknown email costs one argon2id verification against the
    dummy hash. (Throttling password guesses belongs to the web app's login.)
    """
    normalized = normalize_password(password[: PASSWORD_MAX_LENGTH * 4])
    with transaction() as session:
        account = _account_of(session, _address(email))
        encoded = account.password_hash if account is not None else None
        account_id = account.id if account is not None else None
    if not _hash_matches(encoded, normalized, parameters=policy.hash_parameters) or encoded is None:
        return False
    if _needs_rehash(encoded, policy.hash_parameters):
        rehashed = password_hasher(policy.hash_parameters).hash(normalized)
        with transaction() as session:
            account = session.exec(select(Account).where(Account.id == account_id).with_for_update()).first()
            # Only if the password did not change meanwhile.
            if account is not None and account.password_hash == encoded:
                account.password_hash = rehashed
                session.add(account)
    return True


def _rehash(snapshot: _Snapshot, code: str, *, policy: FirstLoginPolicy) -> str | None:
    """A new hash of a usable code that matched a hash made with lower costs, else None."""
    if not snapshot.earns_work or snapshot.encoded is None:
        return None
    if not _needs_rehash(snapshot.encoded, policy.hash_parameters):
        return None
    return password_hasher(policy.hash_parameters).hash(normalize_code(code))
