"""Several deliveries of one event in one provider request: a contract's signed notifications.

Each delivery keeps its own row, claim, lease and ``sent`` record, exactly as
when sent alone (``workers.email.delivery``); only the provider call is shared.
SendGrid gets one request with one personalization per recipient (each sees
only their own address), and each recipient's name is put in by SendGrid's
substitutions, so the copies can share one body.

A request is accepted or refused as a whole. One address SendGrid refuses
(HTTP 400) would fail every signatory's email, so a refused group is not
failed: its deliveries go back to pending and are sent one by one, where the
refusal fails only the email it concerns. A refusal of the account (401, 403: a
bad key, a missing permission) would be the same for each email alone: the
group fails with it, and its dead letter retries them all together.
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

from markupsafe import escape
from sqlalchemy.exc import SQLAlchemyError

from models.cancelling import unwanted_reason
from models.delivery import Claim, DeliveryRow, cancel_delivery, claim_delivery, lease_remaining
from models.errors import (
    DeliveryBusy,
    DeliveryGroupMismatch,
    PermanentError,
    ProviderRejected,
    RenderError,
    UnknownDelivery,
)
from models.types import utc_now
from workers.database import session_scope
from workers.email.backend import EmailBackend, GroupBackend, sends_groups
from workers.email.delivery import (
    LEASE_MARGIN_MS,
    AccountFacts,
    ContractFacts,
    backend_for,
    compose,
    deliver,
    load_contract,
    mark_sent_patiently,
    record_failure,
    timed_send,
)
from workers.email.message import OutgoingEmail, OutgoingGroup, Recipient
from workers.middleware.message_log import note_contract_id
from workers.ops.metrics import count_email
from workers.settings import Settings, get_settings


@dataclass
class GroupOutcome:
    """What became of each delivery of a group."""

    #: What each delivery's claim found (``CLAIMED``: sent by this call).
    claims: dict[int, Claim] = field(default_factory=dict)
    #: Deliveries the provider refused as a group: to be sent one by one (one message each).
    one_by_one: list[int] = field(default_factory=list)


def _placeholder() -> str:
    # Unique per call: no contract text can contain it by chance.
    return f"-recipient-name-{secrets.token_hex(8)}-"


def _fits_both_parts(name: str) -> bool:
    # The provider puts the same value in the text and the HTML part: only a
    # name that HTML escaping leaves unchanged reads the same in both.
    return str(escape(name)) == name


def group_emails(
    deliveries: list[DeliveryRow],
    contract: ContractFacts,
    account: AccountFacts | None,
    settings: Settings,
) -> list[tuple[OutgoingGroup, list[DeliveryRow]]]:
    """The requests to make: recipients whose copies differ only by their name share one.

    A recipient left alone in a request gets their name written in, as when sent alone.
    """
    placeholder = _placeholder()

    def render(delivery: DeliveryRow) -> tuple[OutgoingEmail, bool]:
        substitute = bool(delivery.recipient_name) and _fits_both_parts(delivery.recipient_name or "")
        name_placeholder = placeholder if substitute else None
        return compose(delivery, contract, account, settings, name_placeholder=name_placeholder), substitute

    def key(email: OutgoingEmail) -> tuple[str, ...]:
        return (email.subject, email.text, email.html, email.from_email, email.from_name or "", email.kind)

    rendered = [(delivery, *render(delivery)) for delivery in deliveries]
    sharing = Counter(key(email) for _, email, _ in rendered)
    groups: dict[tuple[str, ...], tuple[list[Recipient], list[DeliveryRow], OutgoingEmail]] = {}
    for delivery, email, substitute in rendered:
        name = delivery.recipient_name
        if substitute and sharing[key(email)] == 1:
            email, substitute = compose(delivery, contract, account, settings), False
        recipients, members, _ = groups.setdefault(key(email), ([], [], email))
        recipients.append(
            Recipient(
                email=delivery.recipient,
                name=name,
                reference=delivery.idempotency_key,
                substitutions={placeholder: name} if substitute and name else {},
            )
        )
        members.append(delivery)
    return [
        (
            OutgoingGroup(
                recipients=tuple(recipients),
                from_email=first.from_email,
                from_name=first.from_name,
                subject=first.subject,
                text=first.text,
                html=first.html,
                kind=first.kind,
            ),
            members,
        )
        for recipients, members, first in groups.values()
    ]


def deliver_group(
    delivery_ids: list[int], *, settings: Settings | None = None, backend: EmailBackend | None = None
) -> GroupOutcome:
    """Send the group's pending deliveries in as few provider requests as their content allows."""
    settings = settings or get_settings()
    backend = backend or backend_for(settings)
    ids = list(dict.fromkeys(delivery_ids))
    if len(ids) == 1 or not sends_groups(backend):
        # A file or console backend writes each copy itself: the single path, one by one.
        claims = {each: deliver(each, settings=settings, backend=backend) for each in ids}
        return GroupOutcome(claims=claims)
    return _deliver_together(ids, backend, settings)


def _deliver_together(ids: list[int], backend: GroupBackend, settings: Settings) -> GroupOutcome:
    lease = timedelta(seconds=settings.send_lease_seconds)
    outcome = GroupOutcome()
    claimed: list[DeliveryRow] = []
    leased: list[DeliveryRow] = []
    planned: list[tuple[OutgoingGroup, list[DeliveryRow]]] = []
    cancelled = 0
    failure: Exception | None = None
    with session_scope() as session:
        now = utc_now()
        rows: list[DeliveryRow] = []
        for delivery_id in ids:
            claim, row = claim_delivery(session, delivery_id, now=now, lease=lease)
            if row is None:
                # Raised inside the transaction: no delivery of the group stays claimed.
                raise UnknownDelivery(f"no email delivery has id {delivery_id}")
            rows.append(row)
            outcome.claims[delivery_id] = claim
            if claim is Claim.CLAIMED:
                claimed.append(row)
            elif claim is Claim.LEASED:
                leased.append(row)
        if len({(row.contract_id, row.kind) for row in rows}) > 1:
            raise DeliveryGroupMismatch(
                f"deliveries {', '.join(map(str, ids))} are not of one contract and kind"
            )
        note_contract_id(rows[0].contract_id)
        if claimed:
            try:
                contract, account = load_contract(session, claimed[0])
                unwanted = unwanted_reason(contract.status, claimed[0].kind) if contract is not None else None
                if unwanted is not None:
                    # Cancelled, or signed before its reminder went out: drop them, quietly.
                    cancelled = sum(
                        cancel_delivery(session, row.id, reason=unwanted, now=now) for row in claimed
                    )
                else:
                    if contract is None:
                        raise RenderError(f"deliveries {', '.join(map(str, ids))} name a missing contract")
                    planned = group_emails(claimed, contract, account, settings)
            except SQLAlchemyError:
                raise
            except Exception as exc:
                # The claims still commit (each counts as an attempt); the error is kept below.
                failure = exc
    kind = rows[0].kind
    if failure is not None:
        for row in claimed:
            record_failure(row.id, kind, failure)
        raise failure
    if cancelled:
        count_email(kind, "cancelled", cancelled)
    if not planned:
        for row in claimed:
            outcome.claims[row.id] = Claim.CANCELLED
    for index, (group, members) in enumerate(planned):
        try:
            provider_message_id = timed_send(backend.name, partial(backend.send_group, group))
        except PermanentError as exc:
            if isinstance(exc, ProviderRejected) and exc.refuses_account:
                # A bad key or a missing permission: each email alone would only be
                # refused the same. This request's and the later ones' fail with it.
                for _, waiting in planned[index:]:
                    for row in waiting:
                        record_failure(row.id, kind, exc)
                raise
            # One refused address refuses the whole request: each one alone, so
            # the others still go out and only the bad one fails.
            for row in members:
                record_failure(row.id, kind, exc, permanent=False)
                outcome.one_by_one.append(row.id)
            continue
        except Exception as exc:
            # Not sent: this request's and the later ones' deliveries wait for the retry.
            for _, waiting in planned[index:]:
                for row in waiting:
                    record_failure(row.id, kind, exc)
            raise
        mark_sent_patiently([row.id for row in members], provider_message_id)
        count_email(kind, "sent", len(members))
    if leased:
        # Another attempt holds these: come back when its leases end (by then
        # it has recorded them, or it died and they are free to take over).
        wait = max(lease_remaining(row, now=now) for row in leased)
        raise DeliveryBusy(
            f"deliveries {', '.join(str(row.id) for row in leased)} are being sent by another attempt",
            retry_after_ms=int(wait.total_seconds() * 1000) + LEASE_MARGIN_MS,
        )
    return outcome
