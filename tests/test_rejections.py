"""Every rejection code of DESIGN §5, at the producer and through the real worker.

(a) The producer API raises the ``Rejected`` subclass at once, with its code and a
message a manager can read, and enqueues nothing. (b) The same bad input written
straight to the broker reaches the actor, which records the rejection on the
contract, sends no email and fails the message at once: it lands in Dramatiq's
dead-letter queue on its first attempt, never retried.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, cast

import dramatiq
import pytest

import actors
from contract_dispatch import contract_status, notify_signatories, send_contract, set_workspace
from models.contract import Contract
from models.errors import (
    ContractConflict,
    ContractNotSignable,
    InvalidCompanyName,
    InvalidEmail,
    InvalidLeadSource,
    InvalidPayload,
    Rejected,
    ResourceGroupRequired,
    SectionsNotAllAccepted,
    UnknownContract,
    UnknownResourceGroup,
    UnknownSection,
    UnknownWorkspace,
)
from models.status import ContractReport
from tests.support import (
    RedisServer,
    all_emails_sent,
    contract_payload,
    unique,
    wait_for_contract,
    wait_until,
)
from workers.database import session_scope

SECTIONS = ["conditions", "tarifs"]


# -- helpers -----------------------------------------------------------------


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The payloads of the public messages enqueued while the test runs."""
    seen: list[Any] = []
    original = actors.broker.enqueue

    def spy(message: Any, *, delay: int | None = None) -> Any:
        if message.actor_name in ("send_contract", "notify_signatories") and message.args:
            seen.append(message.args[0])
        return original(message, delay=delay)

    monkeypatch.setattr(actors.broker, "enqueue", spy)
    yield seen


def _enqueued_for(enqueued: list[Any], contract_id: str) -> list[Any]:
    return [p for p in enqueued if isinstance(p, dict) and p.get("contract_id") == contract_id]


def assert_readable(message: str, *fragments: str) -> None:
    """A sentence for a manager: names what is wrong, no internals."""
    assert message.strip(), "the refusal has no message"
    for internal in ("Traceback", "pydantic", "errors.pydantic.dev", "{'type'", "ValidationError"):
        assert internal not in message, f"internal detail {internal!r} in {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def dead_letters(redis_server: RedisServer, queue: str, message_id: str) -> list[dramatiq.Message]:
    """Dramatiq's dead letters of ``queue`` that carry ``message_id``."""
    client = redis_server.client()
    try:
        stored = client.hgetall(f"dramatiq:{queue}.XQ.msgs")
    finally:
        client.close()
    letters = [dramatiq.Message.decode(cast(bytes, value)) for value in stored.values()]
    return [letter for letter in letters if letter.message_id == message_id]


def assert_failed_at_once(
    redis_server: RedisServer, sent: dramatiq.Message, queue: str = "contracts"
) -> None:
    """The message was dead-lettered after its first attempt.

    A retry re-enqueues the message with ``retries`` counted in its options; the
    dead letter of a first attempt still carries the options it was sent with.
    """
    letters = wait_until(
        lambda: dead_letters(redis_server, queue, sent.message_id),
        timeout=10,
        what=f"message {sent.message_id} to be dead-lettered",
    )
    assert len(letters) == 1
    assert letters[0].options.get("retries", 0) == 0, f"the message was retried: {letters[0].options}"


def _sent_with_invitation(report: ContractReport) -> bool:
    return report.status == "sent" and all_emails_sent(1)(report)


def _send_and_deliver(**overrides: Any) -> dict[str, Any]:
    payload = contract_payload(**overrides)
    assert send_contract(**payload).status == "queued"
    wait_for_contract(payload["contract_id"], _sent_with_invitation, what="the invitation to be delivered")
    return payload


def _rejected(report: ContractReport) -> bool:
    return report.status == "rejected"


def _contract(contract_id: str) -> Contract:
    with session_scope() as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        session.expunge(contract)
        return contract


def _emails_to_contract(standin: Any, contract_id: str) -> list[Any]:
    return [r for r in standin.requests if r.reference and r.reference.split(":")[1] == contract_id]


# -- the bad send_contract inputs, shared by (a) and (b) ----------------------


def _signatories(email: str) -> list[dict[str, Any]]:
    return [{"email": email}]


#: (id, fields to override in a fresh payload, expected class, fragments the message names).
BAD_SENDS: list[tuple[str, dict[str, Any], type[Rejected], tuple[str, ...]]] = [
    ("email-no-at", {"email": "not-an-email"}, InvalidEmail, ("email",)),
    ("email-no-domain", {"email": "client@"}, InvalidEmail, ("email",)),
    ("email-space", {"email": "cli ent@example.com"}, InvalidEmail, ("email",)),
    ("email-empty", {"email": "   "}, InvalidEmail, ("email",)),
    ("signatory-email", {"signatories": _signatories("boss@@example.com")}, InvalidEmail, ("email",)),
    ("company-empty", {"company_name": ""}, InvalidCompanyName, ("company",)),
    ("company-blank", {"company_name": "  \t "}, InvalidCompanyName, ("company",)),
    (
        "company-crlf",
        {"company_name": "Dupont SARL\r\nBcc: victim@example.com"},
        InvalidCompanyName,
        ("control characters",),
    ),
    ("company-nul", {"company_name": "Dupont\x00SARL"}, InvalidCompanyName, ("control characters",)),
    ("company-tab", {"company_name": "Dupont\tSARL"}, InvalidCompanyName, ("control characters",)),
    ("company-too-long", {"company_name": "D" * 201}, InvalidCompanyName, ("company",)),
    (
        "multi-without-group",
        {"workspace_id": "ws-multi"},
        ResourceGroupRequired,
        ("ws-multi", "resource group"),
    ),
    (
        "unknown-group-multi",
        {"workspace_id": "ws-multi", "resource_group_id": "marseille"},
        UnknownResourceGroup,
        ("marseille",),
    ),
    (
        "unknown-group-single",
        {"workspace_id": "ws-main", "resource_group_id": "paris"},
        UnknownResourceGroup,
        ("paris",),
    ),
    ("unknown-workspace", {"workspace_id": "ws-nowhere"}, UnknownWorkspace, ("ws-nowhere",)),
    ("lead-marketplace", {"lead_source": "marketplace"}, InvalidLeadSource, ("bap", "network", "other")),
    ("lead-upper", {"lead_source": "BAP"}, InvalidLeadSource, ("bap",)),
    ("lead-empty", {"lead_source": ""}, InvalidLeadSource, ("bap",)),
    ("no-sections", {"sections": []}, InvalidPayload, ("sections",)),
    ("section-missing-id", {"sections": [{"title": "Tarifs"}]}, InvalidPayload, ("sections",)),
    ("section-id-wrong-type", {"sections": [{"id": 7}]}, InvalidPayload, ("sections",)),
    (
        "section-extra-field",
        {"sections": [{"id": "conditions", "mandatory": True}]},
        InvalidPayload,
        ("mandatory",),
    ),
    (
        "duplicate-sections",
        {"sections": [{"id": "conditions"}, {"id": "conditions"}]},
        InvalidPayload,
        ("unique",),
    ),
    ("no-signatories", {"signatories": []}, InvalidPayload, ("signatories",)),
    ("bad-locale", {"locale": "de"}, InvalidPayload, ("locale",)),
]


def _bad_send(case: tuple[Any, ...]) -> tuple[dict[str, Any], type[Rejected], tuple[str, ...]]:
    _, overrides, expected, fragments = case
    return contract_payload(**overrides), expected, fragments


# -- (a) at the producer API --------------------------------------------------


@pytest.mark.parametrize("case", BAD_SENDS, ids=[c[0] for c in BAD_SENDS])
def test_producer_refuses_bad_send(database, enqueued, case):
    payload, expected, fragments = _bad_send(case)
    with pytest.raises(Rejected) as caught:
        send_contract(**payload)
    assert type(caught.value) is expected
    assert caught.value.code == expected.code
    assert caught.value.as_dict() == {"code": expected.code, "message": caught.value.message}
    assert_readable(caught.value.message, *fragments)
    assert _enqueued_for(enqueued, payload["contract_id"]) == []
    assert contract_status(payload["contract_id"]) is None, "a refused send records nothing"


def test_producer_refuses_conflicting_content_and_keeps_the_original(worker, standin, enqueued):
    original = _send_and_deliver()
    before = _contract(original["contract_id"])
    changed = {**original, "company_name": original["company_name"] + " Bis"}
    enqueued.clear()  # only what the refused call enqueues
    with pytest.raises(ContractConflict) as caught:
        send_contract(**changed)
    assert caught.value.code == "contract_conflict"
    assert_readable(caught.value.message, original["contract_id"], "different content")
    assert _enqueued_for(enqueued, original["contract_id"]) == []

    after = _contract(original["contract_id"])
    assert after.status == "sent"
    assert (after.content_hash, after.company_name, after.error_code) == (
        before.content_hash,
        before.company_name,
        None,
    )
    assert len(standin.accepted_for(f"invitation:{original['contract_id']}:")) == 1
    # The identical message is not a conflict: it changes nothing.
    assert send_contract(**original).status == "sent"


def test_producer_refuses_notify_for_unknown_contract(database, enqueued):
    contract_id = unique("c-missing")
    with pytest.raises(UnknownContract) as caught:
        notify_signatories(contract_id=contract_id, legal_name="Dupont SARL", accepted_sections=SECTIONS)
    assert caught.value.code == "unknown_contract"
    assert_readable(caught.value.message, contract_id)
    assert _enqueued_for(enqueued, contract_id) == []
    assert contract_status(contract_id) is None


@pytest.mark.parametrize(
    ("accepted", "expected", "fragments"),
    [
        (["conditions"], SectionsNotAllAccepted, ("tarifs",)),
        (["tarifs"], SectionsNotAllAccepted, ("conditions",)),
        ([*SECTIONS, "bonus"], UnknownSection, ("bonus",)),
    ],
    ids=["missing-second", "missing-first", "unknown-section"],
)
def test_producer_refuses_incomplete_signature(worker, standin, enqueued, accepted, expected, fragments):
    payload = _send_and_deliver()
    contract_id = payload["contract_id"]
    enqueued.clear()  # only what the refused call enqueues
    with pytest.raises(expected) as caught:
        notify_signatories(
            contract_id=contract_id, legal_name=payload["company_name"], accepted_sections=accepted
        )
    assert caught.value.code == expected.code
    assert_readable(caught.value.message, *fragments)
    assert _enqueued_for(enqueued, contract_id) == []
    report = contract_status(contract_id)
    assert report is not None and report.status == "sent"
    assert [e.kind for e in report.emails] == ["invitation"]
    assert standin.accepted_for(f"signed_notification:{contract_id}:") == []


@pytest.mark.parametrize(
    ("override", "expected", "fragment"),
    [
        ({"legal_name": ""}, InvalidCompanyName, "legal_name"),
        ({"legal_name": "Dupont\r\nSARL"}, InvalidCompanyName, "control characters"),
        ({"accepted_sections": []}, InvalidPayload, "accepted_sections"),
        ({"registration_number": "<script>"}, InvalidPayload, "registration_number"),
    ],
    ids=["legal-name-empty", "legal-name-crlf", "no-sections", "bad-registration-number"],
)
def test_producer_refuses_bad_notify_payload(database, enqueued, override, expected, fragment):
    contract_id = unique("c-notify")
    arguments: dict[str, Any] = {
        "contract_id": contract_id,
        "legal_name": "Dupont SARL",
        "accepted_sections": SECTIONS,
        **override,
    }
    with pytest.raises(expected) as caught:
        notify_signatories(**arguments)
    assert caught.value.code == expected.code
    assert_readable(caught.value.message, fragment)
    assert _enqueued_for(enqueued, contract_id) == []


def _rejected_contract() -> dict[str, Any]:
    """A contract whose send the actor rejected (unknown workspace)."""
    payload = contract_payload(workspace_id=unique("ws-gone"))
    actors.send_contract.send(payload)
    report = wait_for_contract(payload["contract_id"], _rejected, what="the send to be rejected")
    assert report.error is not None and report.error.code == "unknown_workspace"
    return payload


def test_producer_refuses_to_sign_a_rejected_contract(worker, standin, enqueued, redis_server):
    payload = _rejected_contract()
    contract_id = payload["contract_id"]
    enqueued.clear()  # only what the refused call enqueues
    with pytest.raises(ContractNotSignable) as caught:
        notify_signatories(
            contract_id=contract_id, legal_name=payload["company_name"], accepted_sections=SECTIONS
        )
    assert caught.value.code == "contract_not_signable"
    assert_readable(caught.value.message, contract_id, "rejected")
    assert _enqueued_for(enqueued, contract_id) == []
    report = contract_status(contract_id)
    assert report is not None and report.status == "rejected" and report.emails == []


# -- (b) raw messages through the real broker and worker ----------------------


@pytest.mark.parametrize("case", BAD_SENDS, ids=[c[0] for c in BAD_SENDS])
def test_actor_rejects_bad_send(worker, standin, redis_server, case):
    payload, expected, fragments = _bad_send(case)
    sent = actors.send_contract.send(payload)

    report = wait_for_contract(payload["contract_id"], _rejected, what="the send to be rejected")
    assert report.error is not None
    assert report.error.code == expected.code
    assert_readable(report.error.message, *fragments)
    assert report.emails == []
    assert_failed_at_once(redis_server, sent)
    assert _emails_to_contract(standin, payload["contract_id"]) == []


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda p: p.pop("email"), "email"),
        (lambda p: p.pop("signatories"), "signatories"),
        (lambda p: p.update(priority="high"), "priority"),
        (lambda p: p.update(sections="conditions"), "sections"),
        (lambda p: p.update(signatories={"email": "boss@example.com"}), "signatories"),
        (lambda p: p.update(version=2), "version"),
    ],
    ids=[
        "missing-email",
        "missing-signatories",
        "extra-field",
        "sections-string",
        "signatories-object",
        "version",
    ],
)
def test_actor_rejects_malformed_send_payload(worker, standin, redis_server, mutate, fragment):
    payload = contract_payload()
    mutate(payload)
    sent = actors.send_contract.send(payload)

    report = wait_for_contract(payload["contract_id"], _rejected, what="the malformed send to be rejected")
    assert report.error is not None
    assert report.error.code == "invalid_payload"
    assert_readable(report.error.message, fragment)
    assert report.emails == []
    assert_failed_at_once(redis_server, sent)
    assert _emails_to_contract(standin, payload["contract_id"]) == []


@pytest.mark.parametrize(
    "payload",
    [["c-list", "client@example.com"], "c-string", 42, None],
    ids=["list", "string", "number", "null"],
)
def test_actor_fails_non_object_payload_at_once(worker, standin, redis_server, payload):
    sent = actors.send_contract.send(payload)
    assert_failed_at_once(redis_server, sent)
    assert contract_status("c-list") is None
    assert contract_status("c-string") is None


def test_actor_fails_payload_without_usable_contract_id_at_once(worker, standin, redis_server):
    for bad_id in ("has spaces", "", "x" * 300):
        payload = contract_payload(contract_id=bad_id)
        sent = actors.send_contract.send(payload)
        assert_failed_at_once(redis_server, sent)
        if bad_id:
            assert contract_status(bad_id) is None


def test_actor_rejects_conflicting_content_and_keeps_the_original(worker, standin, redis_server):
    original = _send_and_deliver()
    contract_id = original["contract_id"]
    before = _contract(contract_id)

    conflicting = {**original, "email": f"other-{uuid.uuid4().hex[:8]}@example.com"}
    sent = actors.send_contract.send(conflicting)
    assert_failed_at_once(redis_server, sent)
    # A bad duplicate (invalid as well as different) must not touch it either.
    broken = actors.send_contract.send({**original, "email": "not-an-email"})
    assert_failed_at_once(redis_server, broken)

    after = _contract(contract_id)
    assert after.status == "sent"
    assert (after.email, after.content_hash, after.sent_at, after.error_code, after.error_message) == (
        before.email,
        before.content_hash,
        before.sent_at,
        None,
        None,
    )
    report = contract_status(contract_id)
    assert report is not None and len(report.emails) == 1
    assert [r.to for r in _emails_to_contract(standin, contract_id)] == [[original["email"]]]
    assert not [r for r in standin.requests if r.to == [conflicting["email"]]]


def test_actor_rejects_notify_for_unknown_contract(worker, standin, redis_server):
    contract_id = unique("c-missing")
    sent = actors.notify_signatories.send(
        {"contract_id": contract_id, "legal_name": "Dupont SARL", "accepted_sections": SECTIONS}
    )
    assert_failed_at_once(redis_server, sent)
    assert contract_status(contract_id) is None
    assert _emails_to_contract(standin, contract_id) == []


@pytest.mark.parametrize(
    ("accepted", "code", "fragment"),
    [
        (["conditions"], "sections_not_all_accepted", "tarifs"),
        (["conditions", "tarifs", "bonus"], "unknown_section", "bonus"),
        (["bonus"], "unknown_section", "bonus"),
    ],
    ids=["one-missing", "one-unknown", "only-unknown"],
)
def test_actor_rejects_incomplete_signature(worker, standin, redis_server, accepted, code, fragment):
    payload = _send_and_deliver()
    contract_id = payload["contract_id"]
    sent = actors.notify_signatories.send(
        {"contract_id": contract_id, "legal_name": payload["company_name"], "accepted_sections": accepted}
    )

    report = wait_for_contract(contract_id, lambda r: r.error is not None, what="the refusal to be recorded")
    assert report.status == "sent", "a refused signature leaves the contract sent"
    assert report.error is not None and report.error.code == code
    assert_readable(report.error.message, fragment)
    assert report.signed_at is None
    assert [e.kind for e in report.emails] == ["invitation"]
    assert_failed_at_once(redis_server, sent)
    assert standin.accepted_for(f"signed_notification:{contract_id}:") == []

    # The complete signature still goes through afterwards, and clears the error.
    notify_signatories(
        contract_id=contract_id, legal_name=payload["company_name"], accepted_sections=SECTIONS
    )
    signed = wait_for_contract(
        contract_id, lambda r: r.status == "signed" and all_emails_sent(2)(r), what="the signature"
    )
    assert signed.error is None


def test_actor_rejects_malformed_notify_payload(worker, standin, redis_server):
    payload = _send_and_deliver()
    contract_id = payload["contract_id"]
    base = {"contract_id": contract_id, "legal_name": payload["company_name"], "accepted_sections": SECTIONS}
    cases: list[tuple[Any, str]] = [
        ({**base, "extra": True}, "invalid_payload"),
        ({k: v for k, v in base.items() if k != "legal_name"}, "invalid_payload"),
        ({**base, "accepted_sections": "conditions,tarifs"}, "invalid_payload"),
        ({**base, "legal_name": "Dupont\nSARL"}, "invalid_company_name"),
    ]
    for message, code in cases:
        # One at a time: the dead letter marks the end of this message's processing.
        assert_failed_at_once(redis_server, actors.notify_signatories.send(message))
        report = contract_status(contract_id)
        assert report is not None and report.status == "sent"
        assert report.error is not None and report.error.code == code, message
    non_objects: list[Any] = [["not", "an", "object"], "text"]
    for payload_value in non_objects:
        assert_failed_at_once(redis_server, actors.notify_signatories.send(payload_value))
    assert standin.accepted_for(f"signed_notification:{contract_id}:") == []
    report = contract_status(contract_id)
    assert report is not None and [e.kind for e in report.emails] == ["invitation"]


def test_actor_rejects_signing_a_rejected_contract(worker, standin, redis_server):
    payload = _rejected_contract()
    contract_id = payload["contract_id"]
    sent = actors.notify_signatories.send(
        {"contract_id": contract_id, "legal_name": payload["company_name"], "accepted_sections": SECTIONS}
    )
    assert_failed_at_once(redis_server, sent)
    report = contract_status(contract_id)
    assert report is not None
    assert report.status == "rejected"
    assert report.signed_at is None
    assert report.emails == []
    assert report.error is not None
    assert report.error.code == "unknown_workspace", "the reason the send was rejected is kept"
    assert _emails_to_contract(standin, contract_id) == []


# -- what is accepted, recorded, and recoverable ------------------------------


def test_resource_group_is_optional_with_a_single_one_and_recorded(worker, standin):
    single = _send_and_deliver(workspace_id="ws-main")
    assert _contract(single["contract_id"]).resource_group_id == "rg-1"

    explicit = _send_and_deliver(workspace_id="ws-main", resource_group_id="rg-1")
    assert _contract(explicit["contract_id"]).resource_group_id == "rg-1"

    multi = _send_and_deliver(workspace_id="ws-multi", resource_group_id="lyon")
    assert _contract(multi["contract_id"]).resource_group_id == "lyon"

    raw = contract_payload(workspace_id="ws-main")
    actors.send_contract.send(raw)
    wait_for_contract(raw["contract_id"], _sent_with_invitation, what="the raw send without resource group")
    assert _contract(raw["contract_id"]).resource_group_id == "rg-1"


@pytest.mark.parametrize("lead_source", ["bap", "network", "other"])
def test_lead_source_is_recorded(worker, standin, lead_source):
    payload = _send_and_deliver(lead_source=lead_source)
    report = contract_status(payload["contract_id"])
    assert report is not None and report.lead_source == lead_source
    assert _contract(payload["contract_id"]).lead_source == lead_source


@pytest.mark.parametrize("resend", ["producer", "raw"])
def test_rejected_send_succeeds_unchanged_once_the_workspace_exists(worker, standin, redis_server, resend):
    workspace_id = unique("ws-late")
    payload = contract_payload(workspace_id=workspace_id)
    with pytest.raises(UnknownWorkspace):
        send_contract(**payload)
    actors.send_contract.send(payload)
    report = wait_for_contract(payload["contract_id"], _rejected, what="the send to be rejected")
    assert report.error is not None and report.error.code == "unknown_workspace"

    set_workspace(workspace_id, ["main"])
    if resend == "producer":
        assert send_contract(**payload).status == "queued"
    else:
        actors.send_contract.send(payload)
    report = wait_for_contract(payload["contract_id"], _sent_with_invitation, what="the resend to succeed")
    assert report.error is None
    assert _contract(payload["contract_id"]).resource_group_id == "main"
    (invitation,) = standin.accepted_for(f"invitation:{payload['contract_id']}:")
    assert invitation.to == [payload["email"]]


@pytest.mark.parametrize("via", ["producer", "raw message"])
def test_contract_rejected_as_malformed_can_be_sent_properly_later(worker, standin, redis_server, via):
    payload = contract_payload(lead_source="bap")
    broken = {k: v for k, v in payload.items() if k != "email"}
    actors.send_contract.send(broken)
    report = wait_for_contract(payload["contract_id"], _rejected, what="the malformed send to be rejected")
    assert report.error is not None and report.error.code == "invalid_payload"

    if via == "producer":
        assert send_contract(**payload).status == "queued"
    else:
        # Straight to the actor: the row it finds has no content yet, and gets the message's.
        actors.send_contract.send(payload)
    report = wait_for_contract(payload["contract_id"], _sent_with_invitation, what="the proper send")
    assert report.lead_source == "bap"
    contract = _contract(payload["contract_id"])
    assert (contract.email, contract.company_name) == (payload["email"], payload["company_name"])
    assert contract.section_ids() == SECTIONS

    notify_signatories(
        contract_id=payload["contract_id"], legal_name=payload["company_name"], accepted_sections=SECTIONS
    )
    wait_for_contract(payload["contract_id"], lambda r: r.status == "signed", what="the signature")
