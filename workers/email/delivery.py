"""One delivery's journey: claim, render, send, record.

At most once once recorded as sent: the claim is one UPDATE that only a pending
delivery whose lease is free can pass, and ``sent`` is final. The one window
left is between the provider's acceptance and the commit of ``sent``: if the
process dies there, the lease expires and a redelivered message sends the email
again. That window is kept as small as a commit, and the commit is retried for a
while before giving up (see the README, "Duplicates").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import cast
from urllib.parse import quote

from sqlalchemy import bindparam, sql
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session

from models.access_codes import current_access_code
from models.account import Account
from models.cancelling import unwanted_reason
from models.contract import Contract, ContractStatus
from models.delivery import (
    Claim,
    DeliveryRow,
    DeliveryStatus,
    EmailDelivery,
    EmailKind,
    cancel_delivery,
    claim_delivery,
    lease_remaining,
    mark_sent,
    record_attempt_error,
)
from models.errors import DeliveryBusy, DispatchError, PermanentError, RenderError, UnknownDelivery
from models.messages import SendContract
from models.sending import ClaimedInvitation
from models.types import utc_now
from models.upsert import table_of
from workers.database import autocommit, session_scope
from workers.email.backend import EmailBackend, build_backend
from workers.email.message import OutgoingEmail
from workers.email.render import format_datetime, render_email
from workers.middleware.message_log import note_contract_id
from workers.ops.metrics import count_email, observe_provider
from workers.settings import Settings, get_settings

logger = logging.getLogger(__name__)

#: How long to keep retrying the commit of "sent" when the database is down, in seconds.
MARK_SENT_PATIENCE_SECONDS = 60.0

#: A lease-held delivery is retried this long after the lease ends, in milliseconds.
LEASE_MARGIN_MS = 250

_backend_lock = threading.Lock()
_backend: tuple[Settings, EmailBackend] | None = None


def backend_for(settings: Settings) -> EmailBackend:
    """The process's backend, built once per settings object."""
    global _backend
    with _backend_lock:
        if _backend is None or _backend[0] is not settings:
            _backend = (settings, build_backend(settings))
        return _backend[1]


def contract_link(settings: Settings, contract_id: str) -> str:
    """``{APP_BASE_URL}/contracts/{contract_id}``."""
    return f"{settings.app_base_url}/contracts/{quote(contract_id, safe='')}"


def _contract_label(contract: ContractFacts, locale: str) -> str:
    if contract.title:
        return contract.title
    return f"contract {contract.id}" if locale == "en" else f"contrat {contract.id}"


def compose(
    delivery: DeliveryRow,
    contract: ContractFacts | None,
    account: AccountFacts | None,
    settings: Settings,
    *,
    name_placeholder: str | None = None,
) -> OutgoingEmail:
    """Render a delivery from its contract and the contract's account, as the database holds them now.

    With ``name_placeholder``, a recipient name is rendered as that placeholder
    (the provider puts each recipient's name in: see ``workers.email.group_delivery``).
    """
    if contract is None:
        raise RenderError(f"delivery {delivery.id} names a missing contract")
    locale = delivery.locale
    context: dict[str, object] = {
        "locale": locale,
        "contract_id": contract.id,
        "contract_label": _contract_label(contract, locale),
        "company_name": contract.company_name,
        "link": contract_link(settings, contract.id),
        "recipient_name": (name_placeholder or delivery.recipient_name) if delivery.recipient_name else None,
        "step": delivery.step,
    }
    access_code: str | None = None
    if delivery.kind in (EmailKind.INVITATION, EmailKind.REMINDER):
        expires = ""
        # Codes only while the client has never logged in: after that they are useless.
        if delivery.includes_access_code and account is not None and account.first_login_at is None:
            access_code = current_access_code(account, secret_key=settings.secret_key_bytes())
            if account.access_code_expires_at is not None:
                expires = format_datetime(
                    account.access_code_expires_at, locale=locale, timezone=settings.display_timezone
                )
        context.update(login=delivery.recipient, access_code=access_code, access_code_expires_at=expires)
    elif delivery.kind == EmailKind.SIGNED_NOTIFICATION:
        signed_at = contract.signed_at or utc_now()
        context.update(
            legal_name=contract.legal_name or contract.company_name,
            registration_number=contract.registration_number,
            signer_name=contract.signer_name,
            client_email=contract.email,
            signed_at=format_datetime(signed_at, locale=locale, timezone=settings.display_timezone),
        )
    rendered = render_email(delivery.kind, locale, context)
    return OutgoingEmail(
        to_email=delivery.recipient,
        to_name=delivery.recipient_name,
        from_email=settings.mail_from,
        from_name=settings.mail_from_name or None,
        subject=rendered.subject,
        text=rendered.text,
        html=rendered.html,
        reference=delivery.idempotency_key,
        kind=delivery.kind,
        secrets=(access_code,) if access_code else (),
    )


def mark_sent_patiently(delivery_ids: Sequence[int], provider_message_id: str) -> None:
    """Record the provider's acceptance of these deliveries, retrying while the database is down."""
    deadline = time.monotonic() + MARK_SENT_PATIENCE_SECONDS
    pause = 0.2
    while True:
        try:
            # One statement per email, each final on its own: no transaction around them.
            with autocommit() as connection:
                now = utc_now()
                for delivery_id in delivery_ids:
                    mark_sent(connection, delivery_id, provider_message_id=provider_message_id, now=now)
            return
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            logger.warning(
                "Deliveries %s were accepted by the provider; recording it failed, retrying.",
                ", ".join(map(str, delivery_ids)),
            )
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


@dataclass(frozen=True, kw_only=True)
class ContractFacts:
    """What an email says about its contract: the columns read with the claim."""

    id: str
    status: str
    title: str | None
    company_name: str
    email: str
    signed_at: datetime | None
    legal_name: str | None
    registration_number: str | None
    signer_name: str | None


@dataclass(frozen=True, kw_only=True)
class AccountFacts:
    """What an email needs of the client's account: whether, and which, access code it carries."""

    first_login_at: datetime | None
    access_code_nonce: str | None
    access_code_expires_at: datetime | None


_CONTRACT_FIELDS = tuple(field.name for field in fields(ContractFacts))
_ACCOUNT_FIELDS = tuple(field.name for field in fields(AccountFacts))

# Built once: a reused statement keeps its cache key (this runs for every email).
# Plain columns, not ORM objects: an email reads a dozen of the two rows' columns.
_CONTRACTS, _ACCOUNTS = table_of(Contract), table_of(Account)
_CONTRACT_WITH_ACCOUNT = (
    sql.select(
        *(_CONTRACTS.c[name] for name in _CONTRACT_FIELDS),
        _ACCOUNTS.c.id.label("found_account_id"),
        *(_ACCOUNTS.c[name] for name in _ACCOUNT_FIELDS),
    )
    .select_from(_CONTRACTS.outerjoin(_ACCOUNTS, _ACCOUNTS.c.id == _CONTRACTS.c.account_id))
    .where(_CONTRACTS.c.id == bindparam("contract_id"))
)


def load_contract(
    session: Session, delivery: DeliveryRow
) -> tuple[ContractFacts | None, AccountFacts | None]:
    """The delivery's contract and the contract's account, in one round trip."""
    row = session.connection().execute(_CONTRACT_WITH_ACCOUNT, {"contract_id": delivery.contract_id}).first()
    if row is None:
        return None, None
    values = row._mapping
    contract = ContractFacts(**{name: values[name] for name in _CONTRACT_FIELDS})
    if values["found_account_id"] is None:
        return contract, None
    return contract, AccountFacts(**{name: values[name] for name in _ACCOUNT_FIELDS})


def record_failure(
    delivery_id: int, kind: str | None, exc: Exception, *, permanent: bool | None = None
) -> None:
    """Keep the attempt's error on the delivery; a permanent one fails it for good.

    ``permanent`` defaults to whether ``exc`` is a ``PermanentError``.
    """
    if permanent is None:
        permanent = isinstance(exc, PermanentError)
    with session_scope() as session:
        changed = record_attempt_error(
            session,
            delivery_id,
            error=f"{type(exc).__name__}: {exc}",
            now=utc_now(),
            permanent=permanent,
        )
    if changed and kind is not None:
        count_email(kind, "failed" if permanent else "retried")


@dataclass
class Prepared:
    """A delivery's claim and, when claimed, its email: what ``prepare`` read, to send after the commit."""

    delivery_id: int
    claim: Claim
    delivery: DeliveryRow | None
    now: datetime
    email: OutgoingEmail | None = None
    #: The delivery was dropped (its contract cancelled, or signed before its reminder).
    cancelled: bool = False
    #: Rendering failed: raised after the commit, where the attempt's failure is recorded.
    failure: Exception | None = None


def prepare(session: Session, delivery_id: int, *, settings: Settings, now: datetime) -> Prepared:
    """Claim the delivery and read and render its email, in the caller's transaction.

    The claim commits with that transaction and counts as an attempt, even when
    rendering fails (the error is kept, for ``send_prepared`` to record).
    """
    lease = timedelta(seconds=settings.send_lease_seconds)
    claim, delivery = claim_delivery(session, delivery_id, now=now, lease=lease)
    prepared = Prepared(delivery_id=delivery_id, claim=claim, delivery=delivery, now=now)
    if delivery is not None:
        note_contract_id(delivery.contract_id)
    if claim is not Claim.CLAIMED:
        return prepared
    assert delivery is not None
    try:
        contract, account = load_contract(session, delivery)
        unwanted = unwanted_reason(contract.status, delivery.kind) if contract is not None else None
        # Cancelled, or signed before its reminder went out: drop it, quietly.
        prepared.cancelled = unwanted is not None and cancel_delivery(
            session, delivery_id, reason=unwanted, now=now
        )
        prepared.email = compose(delivery, contract, account, settings) if unwanted is None else None
    except SQLAlchemyError:
        raise
    except Exception as exc:
        prepared.failure = exc
    return prepared


def prepare_invitation(
    message: SendContract, invitation: ClaimedInvitation, *, settings: Settings, now: datetime
) -> Prepared:
    """``prepare`` for the invitation ``record_contract`` recorded already claimed.

    Composed from the message and what the transaction gave the account, which
    is what ``prepare`` would read back: the contract was just recorded as sent
    with the message's content (its content hash was checked), and the account's
    code, if any, is the one issued with it. No SQL: call it after the commit,
    so that rendering holds no lock.
    """
    delivery = invitation.delivery
    note_contract_id(delivery.contract_id)
    prepared = Prepared(delivery_id=delivery.id, claim=Claim.CLAIMED, delivery=delivery, now=now)
    code = invitation.access_code or {}
    contract = ContractFacts(
        id=message.contract_id,
        status=ContractStatus.SENT.value,
        title=message.title,
        company_name=message.company_name,
        email=message.email,
        signed_at=None,
        legal_name=None,
        registration_number=None,
        signer_name=None,
    )
    account = AccountFacts(
        first_login_at=invitation.first_login_at,
        access_code_nonce=cast(str | None, code.get("access_code_nonce")),
        access_code_expires_at=cast(datetime | None, code.get("access_code_expires_at")),
    )
    try:
        prepared.email = compose(delivery, contract, account, settings)
    except Exception as exc:
        prepared.failure = exc
    return prepared


def send_prepared(
    prepared: Prepared,
    *,
    settings: Settings | None = None,
    backend: EmailBackend | None = None,
    retried: Callable[[Exception], bool] | None = None,
) -> Claim:
    """Send a prepared delivery once its claim has committed; returns what the claim found.

    Raises ``UnknownDelivery`` for a delivery that does not exist and
    ``DeliveryBusy`` (retry after its lease) for one another attempt holds. A
    failed send is recorded on the delivery: as final unless ``retried(error)``
    says another attempt will come (default: unless it is a ``PermanentError``).
    """
    delivery_id, claim, delivery = prepared.delivery_id, prepared.claim, prepared.delivery
    if claim is Claim.MISSING:
        raise UnknownDelivery(f"no email delivery has id {delivery_id}")
    if claim is Claim.LEASED:
        assert delivery is not None
        # Come back when the holder's lease ends: by then it has recorded the
        # send, or it died and its lease is free to take over.
        remaining = lease_remaining(delivery, now=prepared.now)
        raise DeliveryBusy(
            f"delivery {delivery_id} is being sent by another attempt",
            retry_after_ms=int(remaining.total_seconds() * 1000) + LEASE_MARGIN_MS,
        )
    if claim is not Claim.CLAIMED:
        return claim
    assert delivery is not None
    kind, email = delivery.kind, prepared.email
    try:
        if prepared.failure is not None:
            raise prepared.failure
        if email is None:
            # Counted once committed, like every outcome below.
            if prepared.cancelled:
                count_email(kind, "cancelled")
            return Claim.CANCELLED
        chosen = backend or backend_for(settings or get_settings())
        provider_message_id = timed_send(chosen.name, lambda: chosen.send(email))
    except Exception as exc:
        record_failure(delivery_id, kind, exc, permanent=None if retried is None else not retried(exc))
        raise
    mark_sent_patiently([delivery_id], provider_message_id)
    count_email(kind, "sent")
    return Claim.CLAIMED


def deliver(
    delivery_id: int, *, settings: Settings | None = None, backend: EmailBackend | None = None
) -> Claim:
    """Send one delivery unless it is already sent or failed; returns what the claim found.

    Two short transactions around the provider call: the claim with the reads
    the email needs, then the record of the send.
    """
    settings = settings or get_settings()
    with session_scope() as session:
        prepared = prepare(session, delivery_id, settings=settings, now=utc_now())
    return send_prepared(prepared, settings=settings, backend=backend)


def _error_types() -> dict[str, type[DispatchError]]:
    found: dict[str, type[DispatchError]] = {}
    waiting: list[type[DispatchError]] = [DispatchError]
    while waiting:
        cls = waiting.pop()
        found[cls.__name__] = cls
        waiting.extend(cls.__subclasses__())
    return found


def recorded_failure(delivery_id: int) -> DispatchError | None:
    """The error a failed delivery recorded, rebuilt to be raised again; None unless failed.

    Its type is the recorded one (``ProviderRejected``, ``ProviderUnavailable``...),
    so a dead letter filed from it reads as if the message had met the error itself;
    rebuilt from its type and text only (an error of another library, or of no known
    type, becomes a ``PermanentError`` carrying the whole recorded text).
    """
    table = table_of(EmailDelivery)
    with session_scope() as session:
        row = (
            session.connection()
            .execute(
                sql.select(table.c.contract_id, table.c.status, table.c.last_error).where(
                    table.c.id == delivery_id
                )
            )
            .first()
        )
    if row is not None:
        note_contract_id(row.contract_id)
    if row is None or row.status != DeliveryStatus.FAILED.value:
        return None
    name, _, text = (row.last_error or "").partition(": ")
    cls = _error_types().get(name)
    if cls is None:
        return PermanentError(row.last_error or f"delivery {delivery_id} failed")
    # Not through its constructor: some take more than a message (a retry delay).
    error = cls.__new__(cls)
    error.args = (text,)
    return error


def timed_send(backend_name: str, send: Callable[[], str]) -> str:
    """``send()`` (a backend call), timed: seconds by backend and outcome."""
    started = time.monotonic()
    try:
        provider_message_id = send()
    except Exception as exc:
        observe_provider(backend_name, exc, time.monotonic() - started)
        raise
    observe_provider(backend_name, None, time.monotonic() - started)
    return provider_message_id
