"""A contract's signed notifications: one SendGrid request with one personalization per signatory."""

from __future__ import annotations

from typing import Any

import dramatiq
from sqlmodel import select

from contract_dispatch import notify_signatories, send_contract
from models.dead_letter import DeadLetter
from models.delivery import EmailDelivery
from tests.sendgrid_standin import Answer, Received, SendGridStandIn
from tests.support import (
    all_emails_sent,
    contract_payload,
    enqueue_raw,
    wait_for_contract,
    wait_until,
)
from workers import dead_letters
from workers.database import session_scope
from workers.email.message import OutgoingGroup, Recipient

SIGNATORIES = [
    {"email": "claire@example.com", "name": "Claire Martin"},
    {"email": "paul@example.com", "name": "Paul Durand"},
    {"email": "zoe@example.com", "name": "Zoé Leroy"},
    # A name HTML escaping changes cannot be put in by the provider in both parts.
    {"email": "sean@example.com", "name": "Seán O'Brien & Co"},
    {"email": "nobody@example.com"},
]


def _signed(standin: SendGridStandIn, *, signatories: list[dict[str, Any]] = SIGNATORIES) -> str:
    """Send a contract, wait for its invitation, sign it and wait for every notification."""
    payload = contract_payload(signatories=signatories)
    send_contract(**payload)
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation")
    return str(payload["contract_id"])


def _notify(contract_id: str, count: int) -> None:
    notify_signatories(
        contract_id=contract_id, legal_name="Société Signée SARL", accepted_sections=["conditions", "tarifs"]
    )
    wait_for_contract(
        contract_id,
        lambda r: r.status == "signed" and all_emails_sent(count + 1)(r),
        what="every signatory to be told",
    )


def _notifications(standin: SendGridStandIn, contract_id: str) -> list[Received]:
    return standin.accepted_for(f"signed_notification:{contract_id}:")


def test_signatories_are_told_in_one_request_each_seeing_only_their_own_address_and_name(worker, standin):
    contract_id = _signed(standin)
    _notify(contract_id, len(SIGNATORIES))

    emails = _notifications(standin, contract_id)
    assert sorted(email.to for email in emails) == sorted([s["email"]] for s in SIGNATORIES)
    # The three names the provider can put in share one request; the other two
    # differ in their body and go on their own.
    requests = {email.request_id for email in emails}
    assert len(requests) == 3
    by_address = {email.to[0]: email for email in emails}
    shared = {
        by_address[address].request_id
        for address in ("claire@example.com", "paul@example.com", "zoe@example.com")
    }
    assert len(shared) == 1
    # Alone in its request, a copy carries its name written in, as when sent alone.
    alone = [email for email in emails if sum(other.request_id == email.request_id for other in emails) == 1]
    assert len(alone) == 2
    assert all("substitutions" not in email.body["personalizations"][0] for email in alone)
    for signatory in SIGNATORIES:
        email = by_address[signatory["email"]]
        text, html = email.content("text/plain"), email.content("text/html")
        greeting = f"Bonjour {signatory['name']}," if "name" in signatory else "Bonjour,"
        assert text.startswith(greeting)
        if "name" in signatory:
            assert "-recipient-name-" not in text + html
            others = [s["name"] for s in SIGNATORIES if "name" in s and s is not signatory]
            assert not any(other in text for other in others)
    assert "Seán O&#39;Brien &amp; Co" in by_address["sean@example.com"].content("text/html")
    assert "Zoé Leroy" in by_address["zoe@example.com"].content("text/html")

    with session_scope() as session:
        rows = session.exec(
            select(EmailDelivery).where(
                EmailDelivery.contract_id == contract_id, EmailDelivery.kind == "signed_notification"
            )
        ).all()
    assert {row.status for row in rows} == {"sent"}
    # One provider message id per request, recorded on each of its deliveries.
    assert len({row.provider_message_id for row in rows}) == 3
    assert {row.provider_message_id for row in rows} == {email.message_id for email in emails}


def test_a_group_the_provider_refuses_is_sent_one_by_one(worker, standin):
    signatories = SIGNATORIES[:3]
    contract_id = _signed(standin, signatories=signatories)
    standin.script(Answer(status=400, body=b'{"errors":[{"message":"Invalid personalization"}]}'))
    _notify(contract_id, len(signatories))

    emails = _notifications(standin, contract_id)
    assert sorted(email.to[0] for email in emails) == sorted(s["email"] for s in signatories)
    assert len({email.request_id for email in emails}) == len(signatories)
    refused = [r for r in standin.requests if r.status == 400]
    assert len(refused) == len(signatories)  # the one request, kept as its three emails


def test_a_group_the_provider_refuses_for_the_account_fails_whole_without_one_request_per_email(
    worker, standin
):
    """A bad key (401) or a missing permission (403) is the same for each email alone:
    the group is not split into a request per signatory, each refused again."""
    signatories = SIGNATORIES[:3]
    contract_id = _signed(standin, signatories=signatories)
    standin.script(
        Answer(status=401, body=b'{"errors":[{"message":"The provided authorization grant is invalid"}]}')
    )
    notify_signatories(
        contract_id=contract_id, legal_name="Société Signée SARL", accepted_sections=["conditions", "tarifs"]
    )
    wait_for_contract(
        contract_id,
        lambda r: sorted(e.status for e in r.emails if e.kind == "signed_notification") == ["failed"] * 3,
        what="every notification failed",
    )

    def dead_groups() -> list[DeadLetter]:
        with session_scope() as session:
            return list(
                session.exec(
                    select(DeadLetter).where(
                        DeadLetter.contract_id == contract_id, DeadLetter.actor_name == "deliver_email_group"
                    )
                ).all()
            )

    wait_until(lambda: len(dead_groups()) == 1, what="the group's dead letter")
    (dead,) = dead_groups()
    assert dead.exception_type == "ProviderRejected" and "SendGrid answered 401" in dead.exception_message
    refused = [
        r for r in standin.requests if r.reference and f"signed_notification:{contract_id}:" in r.reference
    ]
    assert len({r.request_id for r in refused}) == 1  # one request, kept as its three emails
    assert {r.status for r in refused} == {401}


def test_a_group_is_retried_after_a_provider_outage_and_each_email_goes_once(worker, standin):
    signatories = SIGNATORIES[:2]
    contract_id = _signed(standin, signatories=signatories)
    standin.script(Answer(status=503), Answer(status=503))
    _notify(contract_id, len(signatories))

    emails = _notifications(standin, contract_id)
    assert sorted(email.to[0] for email in emails) == sorted(s["email"] for s in signatories)
    assert len({email.request_id for email in emails}) == 1


def test_a_group_message_mixing_contracts_is_dead_lettered_and_fails_no_email(
    worker, standin, broker, redis_server
):
    first, second = _signed(standin), _signed(standin, signatories=SIGNATORIES[:1])
    with session_scope() as session:
        ids = [
            session.exec(
                select(EmailDelivery.id).where(
                    EmailDelivery.contract_id == contract_id, EmailDelivery.kind == "invitation"
                )
            ).one()
            for contract_id in (first, second)
        ]
    message_id = enqueue_raw(
        redis_server.client(),
        broker.namespace,
        args=[{"delivery_ids": ids}],
        actor="deliver_email_group",
        queue="emails",
    )

    def dead() -> DeadLetter | None:
        with session_scope() as session:
            return session.exec(select(DeadLetter).where(DeadLetter.message_id == message_id)).first()

    wait_until(lambda: dead() is not None, timeout=30, what="the dead letter")
    letter = dead()
    assert letter is not None and letter.exception_type == "DeliveryGroupMismatch"
    with session_scope() as session:
        statuses = [session.get(EmailDelivery, delivery_id) for delivery_id in ids]
    assert [row.status for row in statuses if row] == ["sent", "sent"]
    # Gone from SQL and Redis: later tests count the dead letters they make.
    assert letter.id is not None
    dead_letters.purge(broker, [letter.id])


def test_copies_of_a_group_are_what_each_recipient_reads():
    group = OutgoingGroup(
        recipients=(
            Recipient(email="a@example.com", name="Ann", reference="r-a", substitutions={"-n-": "Ann"}),
            Recipient(email="b@example.com", name=None, reference="r-b"),
        ),
        from_email="contracts@example.com",
        from_name=None,
        subject="Signed -n-",
        text="Hello -n-",
        html="<p>Hello -n-</p>",
        kind="signed_notification",
    )
    first, second = group.copies()
    assert (first.to_email, first.subject, first.text, first.html, first.reference) == (
        "a@example.com",
        "Signed Ann",
        "Hello Ann",
        "<p>Hello Ann</p>",
        "r-a",
    )
    assert (second.to_email, second.text, second.reference) == ("b@example.com", "Hello -n-", "r-b")


def test_a_dead_group_message_that_named_the_wrong_deliveries_fails_none_of_them(database, broker):
    from models.delivery import EmailKind, NewDelivery, add_delivery
    from models.errors import DeliveryGroupMismatch, ProviderUnavailable
    from models.messages import SendContract, parse_message
    from models.sending import reserve_contract
    from models.types import utc_now

    payload = contract_payload()
    with session_scope() as session:
        reserve_contract(session, parse_message(SendContract, payload), now=utc_now())
        ids = [
            add_delivery(
                session,
                kind=EmailKind.SIGNED_NOTIFICATION,
                delivery=NewDelivery(
                    contract_id=payload["contract_id"], recipient=address, recipient_name=None, locale="fr"
                ),
            )
            for address in ("a@example.com", "b@example.com")
        ]

    def statuses() -> list[str]:
        with session_scope() as session:
            return [row.status for row in (session.get(EmailDelivery, i) for i in ids) if row]

    def file_death(exception: Exception) -> None:
        """What the worker does when the message dies: its dead letter filed."""
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name="emails",
            actor_name="deliver_email_group",
            args=({"delivery_ids": ids},),
            kwargs={},
            options={},
        )
        dead_letters.record(broker, dead_letters.describe(message, exception, now=utc_now()))

    file_death(DeliveryGroupMismatch("not of one contract"))
    assert statuses() == ["pending", "pending"]
    # A group that died sending its own deliveries fails them, like deliver_email.
    file_death(ProviderUnavailable("503 for too long"))
    assert statuses() == ["failed", "failed"]
