"""Emails: escaping, wording, links, the file and console backends, rendering rules.

Flows run through the real broker, a real worker and the SendGrid stand-in, so
what is asserted is exactly what a provider would have received.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import dramatiq
import jinja2
import markupsafe
import pytest
from sqlmodel import select

import actors
from contract_dispatch import Rejected, notify_signatories, send_contract, submit_notify_signatories
from models.access_codes import CodeOnDemand, current_access_code
from models.account import Account
from models.delivery import Claim, EmailDelivery, EmailKind
from models.errors import RenderError
from models.messages import NotifySignatories, SendContract, parse_message
from models.sending import RecordedContract, record_contract
from models.types import utc_now
from tests.sendgrid_standin import Received
from tests.support import all_emails_sent, contract_payload, wait_for_contract
from workers.database import session_scope
from workers.email.backend import build_backend
from workers.email.console_backend import ConsoleBackend
from workers.email.delivery import compose, deliver, load_contract, prepare_invitation
from workers.email.file_backend import FileBackend
from workers.email.message import OutgoingEmail
from workers.email.render import format_datetime, render_email
from workers.settings import get_settings

APP = "https://app.example.com"

#: Fragments that only HTML escaping produces: none may reach a text part or a subject.
HTML_ENTITIES = ("&lt;", "&gt;", "&amp;", "&quot;", "&#34;", "&#39;", "&#x27;")

HOSTILE = "<script>alert(1)</script> \"&'<>"


# -- helpers ------------------------------------------------------------------


class _Anchors(HTMLParser):
    """Collects every ``<a href>`` with its visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.anchors: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.anchors.append((self._href, "".join(self._text).strip()))
            self._href = None


def anchors(html: str) -> list[tuple[str, str]]:
    parser = _Anchors()
    parser.feed(html)
    parser.close()
    return parser.anchors


def subject_of(received: Received) -> str:
    personalized = received.body["personalizations"][0].get("subject")
    return str(personalized or received.body["subject"])


def escaped(value: str) -> str:
    return str(markupsafe.escape(value))


def mark_logged_in(email_address: str) -> None:
    """What the web app records at the client's first login."""
    with session_scope() as session:
        account = session.exec(select(Account).where(Account.email == email_address)).one()
        account.first_login_at = utc_now()
        session.add(account)


def current_code(email_address: str) -> str:
    with session_scope() as session:
        account = session.exec(select(Account).where(Account.email == email_address)).one()
        code = current_access_code(account, secret_key=get_settings().secret_key_bytes())
    assert code is not None
    return code


def only_one(items: list[Received], what: str) -> Received:
    assert len(items) == 1, f"expected exactly one {what}, got {len(items)}"
    return items[0]


def sample_email(**overrides: Any) -> OutgoingEmail:
    fields: dict[str, Any] = {
        "to_email": "client@example.com",
        "to_name": "Élodie Client",
        "from_email": "contracts@example.com",
        "from_name": "Contract Dispatch",
        "subject": "Contrat à signer : Bureau – Dupont & Fils",
        "text": "Bonjour,\nAccéder au contrat : https://app.example.com/contracts/c-1\n",
        "html": (
            "<p>Bonjour,</p><p><a href='https://app.example.com/contracts/c-1'>Accéder au contrat</a></p>"
        ),
        "reference": "invitation:c-1:client@example.com:0",
        "kind": "invitation",
    }
    fields.update(overrides)
    return OutgoingEmail(**fields)


# -- escaping -----------------------------------------------------------------


def test_every_user_field_is_escaped_in_html_and_raw_in_text_and_subject(worker, standin):
    suffix = uuid.uuid4().hex[:8]
    company = f"Dupont {HOSTILE} SA"
    title = f"Bureau <script>alert(2)</script> \"&'<> {suffix}"
    section_title = "Section <script>alert(3)</script> \"&'<>"
    signatory_name = "Claire <script>alert(4)</script> \"&'<>"
    legal_name = "Dupont <b>Légal</b> \"&'<> <script>alert(5)</script>"
    signer_name = "Jean <script>alert(6)</script> \"&'<>"
    # Quotes and ampersands are valid in an address's local part, and the
    # address is shown in both emails.
    client = f"o'brien&co-{suffix}@example.com"
    payload = contract_payload(
        email=client,
        company_name=company,
        title=title,
        sections=[{"id": "conditions", "title": section_title}, {"id": "tarifs", "title": "Tarifs"}],
        signatories=[{"email": f"manager-{suffix}@example.com", "name": signatory_name}],
    )
    contract_id = payload["contract_id"]
    send_contract(**payload)
    wait_for_contract(contract_id, all_emails_sent(1), what="the invitation")
    notify_signatories(
        contract_id=contract_id,
        legal_name=legal_name,
        accepted_sections=["conditions", "tarifs"],
        registration_number="RCS Paris B/123-456.78",
        signer_name=signer_name,
    )
    wait_for_contract(contract_id, lambda r: r.status == "signed" and all_emails_sent(2)(r), what="signing")

    invitation = only_one(standin.accepted_for(f"invitation:{contract_id}:"), "invitation")
    notification = only_one(standin.accepted_for(f"signed_notification:{contract_id}:"), "notification")

    shown = {
        "invitation": (invitation, [company, title, client]),
        "notification": (notification, [title, legal_name, signatory_name, signer_name, client]),
    }
    for what, (received, values) in shown.items():
        html = received.content("text/html")
        text = received.content("text/plain")
        subject = subject_of(received)
        assert "<script" not in html.lower(), f"{what}: raw <script> in the HTML part"
        assert "<b>" not in html, f"{what}: raw markup from a user field in the HTML part"
        for value in values:
            assert escaped(value) in html, f"{what}: {value!r} not escaped in the HTML part"
            assert value in text, f"{what}: {value!r} not verbatim in the text part"
        for entity in HTML_ENTITIES:
            assert entity not in text, f"{what}: HTML entity {entity} in the text part"
            assert entity not in subject, f"{what}: HTML entity {entity} in the subject"
    # Subjects carry the raw label and name, never escaped.
    assert title in subject_of(invitation) and company in subject_of(invitation)
    assert title in subject_of(notification) and legal_name in subject_of(notification)
    # The display name goes to the provider verbatim (JSON, not HTML).
    assert notification.body["personalizations"][0]["to"][0]["name"] == signatory_name
    assert "RCS Paris B/123-456.78" in notification.content("text/plain")
    assert "RCS Paris B/123-456.78" in notification.content("text/html")


def test_registration_number_refuses_markup():
    with pytest.raises(Rejected) as refused:
        notify_signatories(
            contract_id="c-any",
            legal_name="Dupont SA",
            accepted_sections=["conditions"],
            registration_number="<script>alert(1)</script>",
        )
    assert refused.value.code == "invalid_payload"


# -- control characters -------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("company_name", "ACME\r\nBcc: victim@example.com", "invalid_company_name"),
        ("company_name", "ACME\nSARL", "invalid_company_name"),
        ("company_name", "ACME\u2028SARL", "invalid_company_name"),
        ("company_name", "ACME\u202eLRAS", "invalid_company_name"),
        # Invisible: two names that read the same must not be two companies.
        ("company_name", "AC\u200bME", "invalid_company_name"),
        ("company_name", "\ufeffACME", "invalid_company_name"),
        ("company_name", "ACME\u00adSARL", "invalid_company_name"),
        ("title", "Bureau\r\nBcc: victim@example.com", "invalid_payload"),
        ("signatories", [{"email": "boss@example.com", "name": "Claire\nManager"}], "invalid_payload"),
        ("sections", [{"id": "conditions", "title": "Condi\rtions"}], "invalid_payload"),
        ("email", "client\r\n@example.com", "invalid_email"),
    ],
)
def test_send_contract_refuses_control_characters(field, value, code):
    payload = contract_payload(**{field: value})
    with pytest.raises(Rejected) as refused:
        send_contract(**payload)
    assert refused.value.code == code


def test_joiners_that_scripts_need_are_accepted_in_names(worker, standin):
    # ZWNJ belongs inside Persian words; it is not taken for an invisible trick.
    # (On the databases under test, with their worker: a message left queued would
    # be processed later, into whichever database a later test made this process's.)
    name = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 SA"
    payload = contract_payload(company_name=name)
    assert send_contract(**payload).status == "queued"
    report = wait_for_contract(payload["contract_id"], all_emails_sent(1))
    assert report.status == "sent", report
    (invitation,) = standin.accepted_for(f"invitation:{payload['contract_id']}:")
    assert name in invitation.body["content"][0]["value"]


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("legal_name", "Dupont\r\nSA", "invalid_company_name"),
        ("signer_name", "Jean\nDupont", "invalid_payload"),
    ],
)
def test_notify_signatories_refuses_control_characters(field, value, code):
    fields: dict[str, Any] = {
        "contract_id": "c-any",
        "legal_name": "Dupont SA",
        "accepted_sections": ["conditions"],
        field: value,
    }
    with pytest.raises(Rejected) as refused:
        notify_signatories(**fields)
    assert refused.value.code == code


def test_actor_refuses_control_characters_that_bypass_the_producer(worker, standin):
    payload = contract_payload(company_name="ACME\r\nBcc: victim@example.com")
    actors.send_contract.send(payload)
    report = wait_for_contract(payload["contract_id"], lambda r: r.status == "rejected", what="the rejection")
    assert report.error is not None and report.error.code == "invalid_company_name"
    assert report.emails == []
    assert standin.accepted_for(f"invitation:{payload['contract_id']}:") == []


# -- invitation and notification wording --------------------------------------


def test_invitation_in_french_by_default(worker, standin):
    payload = contract_payload(title="Bureau privatif 12 m²")
    contract_id = payload["contract_id"]
    send_contract(**payload)
    wait_for_contract(contract_id, all_emails_sent(1), what="the invitation")
    received = only_one(standin.accepted_for(f"invitation:{contract_id}:"), "invitation")
    link = f"{APP}/contracts/{contract_id}"
    html = received.content("text/html")
    text = received.content("text/plain")

    assert (link, "Accéder au contrat") in anchors(html)
    assert link in text
    assert subject_of(received) == f"Contrat à signer : Bureau privatif 12 m² – {payload['company_name']}"
    assert text.startswith("Bonjour,")
    # A new account: login, temporary password, and the instruction to change it.
    code = current_code(payload["email"])
    for part in (text, html):
        assert payload["email"] in part
        assert code in part
        assert "Mot de passe temporaire" in part
    assert "Vous devrez le changer lors de votre première connexion." in text
    assert '<html lang="fr">' in html


def test_invitation_in_english(worker, standin):
    payload = contract_payload(locale="en")
    del payload["title"]
    contract_id = payload["contract_id"]
    send_contract(**payload)
    wait_for_contract(contract_id, all_emails_sent(1), what="the invitation")
    received = only_one(standin.accepted_for(f"invitation:{contract_id}:"), "invitation")
    link = f"{APP}/contracts/{contract_id}"
    html = received.content("text/html")
    text = received.content("text/plain")

    assert (link, "Access the contract") in anchors(html)
    assert "Accéder" not in html and "Bonjour" not in text
    assert link in text
    # No title: the contract is named by its id, in English.
    assert subject_of(received) == f"Contract to sign: contract {contract_id} – {payload['company_name']}"
    assert text.startswith("Hello,")
    assert "Temporary password" in text and current_code(payload["email"]) in text
    assert "You must change it when you first log in." in text
    assert '<html lang="en">' in html


def test_invitation_without_codes_once_the_client_has_logged_in(worker, standin):
    first = contract_payload()
    send_contract(**first)
    wait_for_contract(first["contract_id"], all_emails_sent(1), what="the first invitation")
    mark_logged_in(first["email"])

    second = contract_payload(email=first["email"], company_name=first["company_name"])
    send_contract(**second)
    wait_for_contract(second["contract_id"], all_emails_sent(1), what="the second invitation")
    received = only_one(standin.accepted_for(f"invitation:{second['contract_id']}:"), "invitation")
    link = f"{APP}/contracts/{second['contract_id']}"
    assert (link, "Accéder au contrat") in anchors(received.content("text/html"))
    for part in (received.content("text/plain"), received.content("text/html")):
        assert "Mot de passe temporaire" not in part
        assert "Identifiant" not in part


@pytest.mark.parametrize(
    ("locale", "wording"),
    [
        (
            "fr",
            {
                "button": "Voir le contrat",
                "subject": "Contrat signé : {title} – {legal}",
                "when": "01/07/2024 à 10:30 (CEST)",
                "legal": "Raison sociale : {legal}",
                "greeting": "Bonjour Claire Manager,",
            },
        ),
        (
            "en",
            {
                "button": "View the contract",
                "subject": "Contract signed: {title} – {legal}",
                "when": "1 July 2024, 10:30 (CEST)",
                "legal": "Company legal name: {legal}",
                "greeting": "Hello Claire Manager,",
            },
        ),
    ],
)
def test_signed_notification_tells_managers_what_was_signed(worker, standin, locale, wording):
    payload = contract_payload(locale=locale, title=f"Bureau {locale}")
    contract_id = payload["contract_id"]
    send_contract(**payload)
    wait_for_contract(contract_id, all_emails_sent(1), what="the invitation")
    legal = f"{payload['company_name']} (siège)"
    submit_notify_signatories(
        parse_message(
            NotifySignatories,
            {
                "contract_id": contract_id,
                "legal_name": legal,
                "accepted_sections": ["conditions", "tarifs"],
                "signer_name": "Jean Dupont",
                "signed_at": "2024-07-01T08:30:00Z",
            },
        )
    )
    wait_for_contract(contract_id, lambda r: r.status == "signed" and all_emails_sent(2)(r), what="signing")
    received = only_one(standin.accepted_for(f"signed_notification:{contract_id}:"), "notification")
    assert received.to == [payload["signatories"][0]["email"]]
    link = f"{APP}/contracts/{contract_id}"
    text = received.content("text/plain")
    html = received.content("text/html")

    assert subject_of(received) == wording["subject"].format(title=payload["title"], legal=legal)
    assert text.startswith(wording["greeting"])
    assert wording["legal"].format(legal=legal) in text
    for part in (text, html):
        assert payload["title"] in part
        assert legal in part
        assert wording["when"] in part
        assert "Jean Dupont" in part
        assert payload["email"] in part
        assert link in part
    assert (link, wording["button"]) in anchors(html)


# -- file and console backends -------------------------------------------------


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n")


def _parse_eml(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def test_file_backend_writes_one_parseable_eml_per_send(tmp_path):
    backend = FileBackend(outbox_dir=tmp_path / "outbox", mail_domain="example.com")
    outgoing = sample_email()
    before = datetime.now(UTC).replace(microsecond=0)
    first = backend.send(outgoing)
    second = backend.send(outgoing)

    assert first != second
    files = sorted(p.name for p in (tmp_path / "outbox").iterdir())
    assert files == sorted([first, second]), "a duplicate send must show as a second file"
    assert all(name.endswith(".eml") for name in files)

    message = _parse_eml((tmp_path / "outbox" / first).read_bytes())
    assert message.defects == []
    (sender,) = message["From"].addresses
    assert (sender.addr_spec, sender.display_name) == ("contracts@example.com", "Contract Dispatch")
    (recipient,) = message["To"].addresses
    assert (recipient.addr_spec, recipient.display_name) == ("client@example.com", "Élodie Client")
    assert message["Subject"] == outgoing.subject
    sent_at = email.utils.parsedate_to_datetime(message["Date"])
    assert before <= sent_at <= datetime.now(UTC)
    assert message["Message-ID"].startswith("<") and message["Message-ID"].endswith("@example.com>")
    assert message.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in message.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    plain = message.get_body(preferencelist=("plain",))
    rich = message.get_body(preferencelist=("html",))
    # On disk lines end in CRLF, as RFC 5322 wants; the parser keeps them in bodies.
    assert plain is not None and _lf(plain.get_content()) == outgoing.text
    assert rich is not None and _lf(rich.get_content()).rstrip("\n") == outgoing.html
    assert b"\r\n" in (tmp_path / "outbox" / first).read_bytes()

    other = _parse_eml((tmp_path / "outbox" / second).read_bytes())
    assert other["Message-ID"] != message["Message-ID"]
    # No half-written temporary file is left behind.
    assert not [p for p in (tmp_path / "outbox").iterdir() if p.name.startswith(".")]


def test_file_backend_never_writes_a_header_with_a_line_break(tmp_path):
    backend = FileBackend(outbox_dir=tmp_path, mail_domain="example.com")
    with pytest.raises(ValueError):
        backend.send(sample_email(subject="Hello\r\nBcc: victim@example.com"))
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".eml"]


def test_console_backend_prints_the_message(capsys):
    outgoing = sample_email()
    message_id = ConsoleBackend(mail_domain="example.com").send(outgoing)
    printed = capsys.readouterr().out
    message = email.message_from_string(printed, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    assert message["Subject"] == outgoing.subject
    assert message["To"].addresses[0].addr_spec == "client@example.com"
    assert message["Message-ID"] == f"<{message_id}>"
    plain = message.get_body(preferencelist=("plain",))
    assert plain is not None and _lf(plain.get_content()) == outgoing.text
    assert message.get_body(preferencelist=("html",)) is not None


def test_whole_delivery_with_the_file_backend(database, tmp_path):
    """A delivery recorded by send_contract's own transaction, sent by the file backend."""
    file_settings = get_settings().model_copy(update={"email_backend": "file", "outbox_dir": tmp_path})
    backend = build_backend(file_settings)
    assert isinstance(backend, FileBackend) and backend.outbox_dir == tmp_path

    payload = contract_payload(company_name="Dupont & Fils <SA>")
    message = parse_message(SendContract, payload)
    with session_scope() as session:
        (delivery_id,) = record_contract(
            session,
            message,
            access_code=CodeOnDemand(policy=file_settings.access_code_policy(), now=utc_now()),
            reminders=file_settings.reminder_policy(),
            now=utc_now(),
        ).delivery_ids
    deliver(delivery_id, settings=file_settings, backend=backend)

    (written,) = list(tmp_path.iterdir())
    with session_scope() as session:
        delivery = session.get(EmailDelivery, delivery_id)
        assert delivery is not None
        assert delivery.kind == EmailKind.INVITATION
        assert delivery.status == "sent"
        assert delivery.provider_message_id == written.name
        reference = delivery.idempotency_key
    eml = _parse_eml(written.read_bytes())
    assert eml["To"].addresses[0].addr_spec == payload["email"]
    assert eml["Subject"] == f"Contrat à signer : {payload['title']} – Dupont & Fils <SA>"
    # A long header is folded after its colon; unfolding leaves that space.
    assert eml["X-Contract-Dispatch-Reference"].strip() == reference
    plain = eml.get_body(preferencelist=("plain",))
    rich = eml.get_body(preferencelist=("html",))
    assert plain is not None and rich is not None
    link = f"{APP}/contracts/{payload['contract_id']}"
    assert link in plain.get_content() and "Dupont & Fils <SA>" in plain.get_content()
    assert (link, "Accéder au contrat") in anchors(rich.get_content())
    assert "Dupont &amp; Fils &lt;SA&gt;" in rich.get_content()
    assert current_code(payload["email"]) in plain.get_content()

    # Sent is final: a second delivery attempt writes nothing.
    deliver(delivery_id, settings=file_settings, backend=backend)
    assert list(tmp_path.iterdir()) == [written]


@pytest.mark.parametrize(
    "case", ["new account", "code reissued", "logged in", "english, no title", "redelivered"]
)
def test_the_invitation_send_contract_composes_is_the_one_read_back_from_the_database(database, case):
    """send_contract records its invitation already claimed and composes it from what its
    transaction wrote (no claim, no read back): the email must be the one ``prepare``
    would compose from the database, code and expiry included."""
    settings = get_settings()
    overrides: dict[str, Any] = {}
    if case == "english, no title":
        overrides = {"locale": "en", "title": None}
    payload = contract_payload(**overrides)
    if case in ("code reissued", "logged in"):
        earlier = contract_payload(email=payload["email"], company_name=payload["company_name"])
        record(parse_message(SendContract, earlier), settings=settings)
        if case == "logged in":
            mark_logged_in(payload["email"])
    message = parse_message(SendContract, payload)
    if case == "redelivered":
        # Recorded by an earlier delivery of the same message: claimed as any delivery.
        record(message, settings=settings)
    recorded = record(message, settings=settings)
    if case == "redelivered":
        assert recorded.invitation is None
        return
    invitation = recorded.invitation
    assert invitation is not None and recorded.delivery_ids == [invitation.delivery.id]
    composed = prepare_invitation(message, invitation, settings=settings, now=utc_now())
    assert composed.claim is Claim.CLAIMED and composed.failure is None and composed.email is not None
    with session_scope() as session:
        stored = session.get_one(EmailDelivery, invitation.delivery.id)
        # As a claim leaves it: one attempt counted, its lease taken.
        assert (stored.status, stored.attempts) == ("pending", 1)
        assert stored.lease_expires_at == invitation.delivery.lease_expires_at is not None
        contract, account = load_contract(session, invitation.delivery)
    read_back = compose(invitation.delivery, contract, account, settings)
    assert composed.email == read_back
    carries_code = case != "logged in"
    assert bool(composed.email.secrets) is carries_code
    if carries_code:
        assert current_code(payload["email"]) in composed.email.text


def record(message: SendContract, *, settings: Any) -> RecordedContract:
    """send_contract's transaction, with a code hashed for it when it needs one (``with_access_code``)."""
    now = utc_now()
    with session_scope() as session:
        return record_contract(
            session,
            message,
            access_code=CodeOnDemand(policy=settings.access_code_policy(), now=now),
            reminders=settings.reminder_policy(),
            now=now,
            claim_lease=timedelta(seconds=settings.send_lease_seconds),
        )


# -- rendering rules ------------------------------------------------------------


def _invitation_context(**overrides: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "locale": "fr",
        "contract_id": "c-1",
        "contract_label": "Bureau",
        "company_name": "Dupont SA",
        "link": f"{APP}/contracts/c-1",
        "recipient_name": None,
        "login": "client@example.com",
        "access_code": None,
        "access_code_expires_at": "",
    }
    context.update(overrides)
    return context


@pytest.mark.parametrize("locale", ["de", "", "fr-FR", "EN"])
def test_unknown_locale_falls_back_to_french(locale):
    context = _invitation_context()
    assert render_email("invitation", locale, context) == render_email("invitation", "fr", context)
    assert render_email("invitation", locale, context).subject.startswith("Contrat à signer")


def test_missing_template_is_a_render_error():
    with pytest.raises(RenderError):
        render_email("no_such_email", "fr", _invitation_context())


def test_missing_value_is_a_render_error():
    context = _invitation_context()
    del context["company_name"]
    with pytest.raises(RenderError):
        render_email("invitation", "fr", context)


def test_subject_with_a_line_break_is_a_render_error():
    with pytest.raises(RenderError):
        render_email("invitation", "fr", _invitation_context(company_name="Dupont\r\nBcc: x@example.com"))


@pytest.mark.parametrize(
    ("moment", "locale", "expected"),
    [
        # 23:30 UTC in winter is already the next day in Paris.
        (datetime(2024, 1, 15, 23, 30, tzinfo=UTC), "fr", "16/01/2024 à 00:30 (CET)"),
        (datetime(2024, 1, 15, 23, 30, tzinfo=UTC), "en", "16 January 2024, 00:30 (CET)"),
        (datetime(2024, 7, 1, 8, 30, tzinfo=UTC), "fr", "01/07/2024 à 10:30 (CEST)"),
        (datetime(2024, 7, 1, 8, 30, tzinfo=UTC), "en", "1 July 2024, 10:30 (CEST)"),
    ],
)
def test_format_datetime_in_paris_time(moment, locale, expected):
    assert format_datetime(moment, locale=locale, timezone="Europe/Paris") == expected


def test_settings_display_paris_time_by_default():
    assert get_settings().display_timezone == "Europe/Paris"


def test_outbox_file_names_are_safe_for_any_reference(tmp_path):
    backend = FileBackend(outbox_dir=tmp_path, mail_domain="example.com")
    name = backend.send(sample_email(reference="invitation:c-1:o'brien&co/../x@example.com:0"))
    written = tmp_path / name
    assert re.fullmatch(r"[A-Za-z0-9._-]+\.eml", name)
    assert written.is_file() and written.parent == tmp_path


@pytest.mark.parametrize("locale", ["fr", "en"])
@pytest.mark.parametrize("title", [None, "Bureau privatif"])
def test_every_email_names_the_contract_once(locale, title):
    """The label is the title, or "contrat C-1" without one: no "le contrat contrat C-1"."""
    from models.delivery import DeliveryRow
    from workers.email.delivery import AccountFacts, ContractFacts, compose

    signed_at = datetime(2024, 7, 1, 8, 30, tzinfo=UTC)
    contract = ContractFacts(
        id="C-1",
        status="signed",
        title=title,
        company_name="Atelier Martin SARL",
        email="client@example.com",
        signed_at=signed_at,
        legal_name="Atelier Martin SARL",
        registration_number=None,
        signer_name=None,
    )
    account = AccountFacts(first_login_at=signed_at, access_code_nonce=None, access_code_expires_at=None)
    word = "contract" if locale == "en" else "contrat"
    label = title or f"{word} C-1"
    for kind in EmailKind:
        delivery = DeliveryRow(
            id=1,
            kind=kind.value,
            contract_id="C-1",
            recipient="manager@example.com",
            recipient_name=None,
            step=0,
            locale=locale,
            includes_access_code=False,
            status="pending",
            lease_expires_at=None,
        )
        outgoing = compose(delivery, contract, account, get_settings())
        for part in (outgoing.subject, outgoing.text):
            assert label in part, (kind, part)
            assert re.search(rf"\b{word}\W+{word}\b", part, re.IGNORECASE) is None, (kind, part)


# -- templates at a worker's boot ------------------------------------------------------------


def test_a_producer_imports_no_template_engine(test_environment: dict[str, str]) -> None:
    # A producer imports the actors (its broker and messages) but never renders:
    # Jinja2 would be about 60 ms of every producer command's start.
    script = "import sys, actors, contract_dispatch, workers.cli; print('jinja2' in sys.modules)"
    env = {**os.environ, **test_environment}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done


def test_a_worker_compiles_every_template_at_boot(
    broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.email import render
    from workers.middleware import Templates

    (templates_middleware,) = [m for m in broker.middleware if isinstance(m, Templates)]
    render._environment.cache_clear()
    templates_middleware.before_worker_boot(broker, None)

    def no_file(*args: object) -> None:
        raise AssertionError(f"a template read at render time: {args[-1]!r}")

    # Every kind and locale renders from what the boot compiled, reading no file.
    monkeypatch.setattr(jinja2.FileSystemLoader, "get_source", no_file)
    kinds = {path.name.split(".")[0] for path in render.TEMPLATES_DIR.glob("*.subject")}
    assert kinds == {kind.value for kind in EmailKind}
    context = {
        **_invitation_context(),
        "client_email": "client@example.com",
        "legal_name": "Dupont SA",
        "registration_number": "123 456 789",
        "signed_at": "1 December 2026",
        "signer_name": "Jeanne Dupont",
    }
    for kind in sorted(kinds):
        for locale in render.LOCALES:
            rendered = render_email(kind, locale, context)
            assert rendered.subject and rendered.text and rendered.html
