"""Rule 4, one email one company (DESIGN §1.4 and its normalisation, §5).

Through the producer API, the CLI, and raw messages that bypass the producer so the
actor's own check is exercised, on the real broker, a real worker, SQL and the
SendGrid stand-in.
"""

from __future__ import annotations

import json
import sys
import unicodedata
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlmodel import col, select

import actors
from contract_dispatch import contract_status, send_contract
from models.account import Account
from models.binding import check_binding, normalize_company_name, normalize_email
from models.contract import Contract
from models.errors import EmailBoundToOtherCompany, Rejected
from models.text import has_control_characters
from tests.support import all_emails_sent, contract_payload, send_args, unique, wait_for_contract
from workers.cli import main as cli_main
from workers.database import session_scope

CASE_OR_SPACING = "differ only by letter case or spacing"


def _suffix() -> str:
    return uuid.uuid4().hex[:8]


def _sent_with_invitation(report: Any) -> bool:
    return report.status == "sent" and all_emails_sent(1)(report)


def _send_and_deliver(**overrides: Any) -> dict[str, Any]:
    """Send through the producer API and wait until the invitation is delivered."""
    payload = contract_payload(**overrides)
    receipt = send_contract(**payload)
    assert receipt.status == "queued"
    wait_for_contract(payload["contract_id"], _sent_with_invitation, what="the invitation to be delivered")
    return payload


def _account(email: str) -> Account | None:
    with session_scope() as session:
        account = session.exec(select(Account).where(Account.email == email)).first()
        if account is not None:
            session.expunge(account)
        return account


def _contract(contract_id: str) -> Contract:
    with session_scope() as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        session.expunge(contract)
        return contract


def _refused(**payload: Any) -> EmailBoundToOtherCompany:
    """Send through the producer API, expect the binding refusal, check nothing happened."""
    with pytest.raises(EmailBoundToOtherCompany) as caught:
        send_contract(**payload)
    assert caught.value.code == "email_bound_to_other_company"
    assert contract_status(payload["contract_id"]) is None, "a refused send must not be recorded"
    return caught.value


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The payloads of the public messages enqueued while the test runs."""
    seen: list[dict[str, Any]] = []
    original = actors.broker.enqueue

    def spy(message: Any, *, delay: int | None = None) -> Any:
        if message.actor_name in ("send_contract", "notify_signatories") and message.args:
            seen.append(message.args[0])
        return original(message, delay=delay)

    monkeypatch.setattr(actors.broker, "enqueue", spy)
    yield seen


def _enqueued_for(enqueued: list[dict[str, Any]], contract_id: str) -> list[dict[str, Any]]:
    return [p for p in enqueued if isinstance(p, dict) and p.get("contract_id") == contract_id]


# -- pure rules --------------------------------------------------------------


def test_check_binding_accepts_exactly_the_bound_name():
    check_binding(bound_company="Dupont SARL", requested_company="Dupont SARL")


@pytest.mark.parametrize(
    "requested",
    ["DUPONT SARL", "dupont sarl", "Dupont  SARL", "Dupont\u00a0SARL", "DupontSARL", " Dupont SARL"],
    ids=["upper", "lower", "double-space", "nbsp", "missing-space", "leading-space"],
)
def test_check_binding_names_a_case_or_spacing_mistake(requested):
    with pytest.raises(EmailBoundToOtherCompany) as caught:
        check_binding(bound_company="Dupont SARL", requested_company=requested)
    assert CASE_OR_SPACING in caught.value.message
    assert "Dupont SARL" not in caught.value.message
    assert "Dupont" not in caught.value.message


def test_check_binding_refuses_another_name_without_revealing_it():
    with pytest.raises(EmailBoundToOtherCompany) as caught:
        check_binding(bound_company="Alpha Conseil", requested_company="Beta Industries")
    assert caught.value.code == "email_bound_to_other_company"
    assert "Alpha" not in caught.value.message
    assert CASE_OR_SPACING not in caught.value.message
    assert "another company" in caught.value.message


def test_normalize_company_name_trims_and_composes_but_keeps_case():
    composed = unicodedata.normalize("NFC", "Société Générale")
    decomposed = unicodedata.normalize("NFD", "Société Générale")
    assert composed != decomposed
    assert normalize_company_name(decomposed) == composed
    assert normalize_company_name(f" \t{decomposed}  \n") == composed
    assert normalize_company_name("DUPONT sarl") == "DUPONT sarl"
    assert normalize_company_name("Dupont  SARL") == "Dupont  SARL", "inner spacing is the sender's"


@pytest.mark.parametrize("bad", ["", "   ", "Dupont\r\nBcc: x@example.com", "Dupont\x00", "Dupont\u202eLRAS"])
def test_normalize_company_name_refuses_empty_and_control_characters(bad):
    with pytest.raises(ValueError):
        normalize_company_name(bad)


def test_control_characters_are_found_in_every_code_point_of_their_categories():
    # Reference: the categories the rule names, checked character by character
    # (has_control_characters skips that walk for printable text). Unassigned
    # code points (Cn) are neither refused nor printable: left out, for time.
    refused = {"Cc", "Zl", "Zp", "Cf"}
    joiners = {"\u200c", "\u200d"}
    characters = [chr(code_point) for code_point in range(sys.maxunicode + 1)]
    categories = [unicodedata.category(character) for character in characters]
    checked = 0
    for character, category in zip(characters, categories, strict=True):
        if category != "Cn":
            expected = category in refused and character not in joiners
            assert has_control_characters(character) is expected, hex(ord(character))
            checked += 1
    assert checked > 150_000
    assert not has_control_characters("Société Générale, 12 rue d'Alésia")
    assert has_control_characters("ACME\u202eSARL")


def test_normalize_email_folds_the_domain_only():
    assert normalize_email("  Client.Name@EXAMPLE.Com ") == "Client.Name@example.com"
    assert normalize_email("client@example.com") != normalize_email("Client@example.com")


@pytest.mark.parametrize("bad", ["", "no-at-sign", "a@", "@example.com", "a b@example.com", "a@exa mple.com"])
def test_normalize_email_refuses_non_addresses(bad):
    with pytest.raises(ValueError):
        normalize_email(bad)


# -- through the producer, the broker and a worker ---------------------------


def test_first_contract_binds_and_the_same_name_again_is_accepted(worker, standin):
    first = _send_and_deliver()
    account = _account(first["email"])
    assert account is not None
    assert account.company_name == first["company_name"]

    second = _send_and_deliver(email=first["email"], company_name=first["company_name"])
    assert second["contract_id"] != first["contract_id"]
    assert _contract(second["contract_id"]).account_id == account.id
    invitations = [r for r in standin.accepted if r.reference and r.reference.startswith("invitation:")]
    to_client = [r for r in invitations if r.to == [first["email"]]]
    assert sorted(r.reference.split(":")[1] for r in to_client if r.reference) == sorted(
        [first["contract_id"], second["contract_id"]]
    ), "each contract to the bound address sends its own invitation"


@pytest.mark.parametrize(
    ("bound", "requested"),
    [("Dupont SARL", "DUPONT SARL"), ("DUPONT SARL", "Dupont SARL"), ("Dupont SARL", "Dupont  SARL")],
    ids=["upper-case", "lower-case", "extra-inner-space"],
)
def test_case_or_spacing_difference_is_refused_with_a_hint(worker, standin, enqueued, bound, requested):
    suffix = _suffix()
    first = _send_and_deliver(company_name=f"{bound} {suffix}")
    attempt = contract_payload(email=first["email"], company_name=f"{requested} {suffix}")

    error = _refused(**attempt)
    assert CASE_OR_SPACING in error.message
    assert first["company_name"] not in error.message
    assert suffix not in error.message
    assert _enqueued_for(enqueued, attempt["contract_id"]) == []
    assert standin.accepted_for(f"invitation:{attempt['contract_id']}:") == []
    account = _account(first["email"])
    assert account is not None and account.company_name == first["company_name"], "the binding is unchanged"


def test_different_name_is_refused_without_revealing_the_bound_name(worker, standin, enqueued, capsys):
    secret = f"Alpha Holding {_suffix()}"
    first = _send_and_deliver(company_name=secret)
    attempt = contract_payload(email=first["email"], company_name=f"Beta Conseil {_suffix()}")

    # The producer API.
    error = _refused(**attempt)
    assert secret not in error.message
    assert "Alpha" not in error.message
    assert CASE_OR_SPACING not in error.message
    assert _enqueued_for(enqueued, attempt["contract_id"]) == []

    # The CLI: a refusal, on stderr, with the code.
    capsys.readouterr()
    assert cli_main(send_args(attempt)) == 2
    out, err = capsys.readouterr()
    assert err.startswith("email_bound_to_other_company: ")
    assert secret not in out + err
    assert "Alpha" not in out + err
    assert contract_status(attempt["contract_id"]) is None

    # The actor, bypassing the producer: the refusal is the contract's status.
    actors.send_contract.send(attempt)
    report = wait_for_contract(attempt["contract_id"], lambda r: r.status == "rejected", what="the rejection")
    assert report.error is not None
    assert report.error.code == "email_bound_to_other_company"
    assert secret not in report.error.message
    assert "Alpha" not in report.error.message
    assert report.emails == []
    assert cli_main(["contract-status", attempt["contract_id"], "--json"]) == 0
    out, err = capsys.readouterr()
    status = json.loads(out)
    assert status["status"] == "rejected"
    assert status["error"]["code"] == "email_bound_to_other_company"
    assert secret not in out + err
    assert "Alpha" not in out + err
    assert standin.accepted_for(f"invitation:{attempt['contract_id']}:") == []


def test_surrounding_whitespace_is_not_part_of_the_name(worker, standin):
    first = _send_and_deliver(company_name=f"Dupont SARL {_suffix()}")
    padded = f"  \t{first['company_name']}  "
    second = _send_and_deliver(email=f"  {first['email']} ", company_name=padded)
    assert _contract(second["contract_id"]).company_name == first["company_name"]

    # The actor normalises too: the same padding in a raw message is accepted.
    raw = contract_payload(email=first["email"], company_name=f"\n{first['company_name']} \t")
    actors.send_contract.send(raw)
    wait_for_contract(raw["contract_id"], _sent_with_invitation, what="the raw padded send")


def test_composed_and_decomposed_forms_are_the_same_name(worker, standin):
    name = f"Société Générale {_suffix()}"
    composed = unicodedata.normalize("NFC", name)
    decomposed = unicodedata.normalize("NFD", name)
    assert composed != decomposed

    # Bound in decomposed form: stored composed.
    first = _send_and_deliver(company_name=decomposed)
    account = _account(first["email"])
    assert account is not None and account.company_name == composed

    _send_and_deliver(email=first["email"], company_name=composed)
    _send_and_deliver(email=first["email"], company_name=decomposed)

    # Raw, bypassing the producer's normalisation.
    raw = contract_payload(email=first["email"], company_name=decomposed)
    actors.send_contract.send(raw)
    wait_for_contract(raw["contract_id"], _sent_with_invitation, what="the raw decomposed send")

    # Composed first, decomposed later, on another address.
    other = _send_and_deliver(company_name=composed + " Bis")
    _send_and_deliver(email=other["email"], company_name=unicodedata.normalize("NFD", composed + " Bis"))


def test_one_person_two_companies_uses_two_addresses(worker, standin):
    domain_a, domain_b = f"{unique('a')}.example.com", f"{unique('b')}.example.com"
    company_a, company_b = f"Company A {_suffix()}", f"Company B {_suffix()}"
    a = _send_and_deliver(email=f"jean@{domain_a}", company_name=company_a)
    b = _send_and_deliver(email=f"jean@{domain_b}", company_name=company_b)

    account_a, account_b = _account(a["email"]), _account(b["email"])
    assert account_a is not None and account_b is not None
    assert account_a.id != account_b.id
    assert (account_a.company_name, account_b.company_name) == (company_a, company_b)
    # And each address stays with its own company.
    _refused(**contract_payload(email=f"jean@{domain_a}", company_name=company_b))
    _refused(**contract_payload(email=f"jean@{domain_b}", company_name=company_a))


def test_email_domain_is_case_insensitive(worker, standin):
    domain = f"{unique('d')}.example.com"
    company = f"Casse Domaine {_suffix()}"
    first = _send_and_deliver(email=f"Client@{domain}", company_name=company)

    # The same account: the other company is refused, the same one accepted.
    _refused(**contract_payload(email=f"Client@{domain.upper()}", company_name=f"Autre {_suffix()}"))
    second = _send_and_deliver(email=f"Client@{domain.upper()}", company_name=company)
    assert _contract(second["contract_id"]).account_id == _contract(first["contract_id"]).account_id

    (invitation,) = standin.accepted_for(f"invitation:{second['contract_id']}:")
    assert invitation.to == [f"Client@{domain}"]

    # The actor agrees.
    raw = contract_payload(email=f"Client@{domain.upper()}", company_name=f"Autre {_suffix()}")
    actors.send_contract.send(raw)
    report = wait_for_contract(raw["contract_id"], lambda r: r.status == "rejected", what="the rejection")
    assert report.error is not None and report.error.code == "email_bound_to_other_company"


def test_email_local_part_is_exact(worker, standin):
    domain = f"{unique('l')}.example.com"
    lower = _send_and_deliver(email=f"client@{domain}", company_name=f"Minuscule {_suffix()}")
    upper = _send_and_deliver(email=f"Client@{domain}", company_name=f"Majuscule {_suffix()}")

    account_lower, account_upper = _account(f"client@{domain}"), _account(f"Client@{domain}")
    assert account_lower is not None and account_upper is not None
    assert account_lower.id != account_upper.id
    assert account_lower.company_name == lower["company_name"]
    assert account_upper.company_name == upper["company_name"]
    (invitation,) = standin.accepted_for(f"invitation:{upper['contract_id']}:")
    assert invitation.to == [f"Client@{domain}"]


def test_the_actor_rechecks_when_two_sends_race(worker, standin):
    """Two raw sends for one new address, different companies: exactly one binds."""
    pairs = []
    for _ in range(4):
        email = f"race-{_suffix()}@example.com"
        contenders = [contract_payload(email=email, company_name=f"Race {n} {_suffix()}") for n in (1, 2)]
        pairs.append((email, contenders))
    for _, contenders in pairs:
        for payload in contenders:
            actors.send_contract.send(payload)

    for email, contenders in pairs:
        reports = [
            wait_for_contract(
                p["contract_id"],
                lambda r: r.status == "rejected" or _sent_with_invitation(r),
                what="both racing sends to finish",
            )
            for p in contenders
        ]
        statuses = sorted(r.status for r in reports)
        assert statuses == ["rejected", "sent"], statuses
        winner = contenders[[r.status for r in reports].index("sent")]
        loser_report = next(r for r in reports if r.status == "rejected")
        assert loser_report.error is not None
        assert loser_report.error.code == "email_bound_to_other_company"
        assert winner["company_name"] not in loser_report.error.message
        assert loser_report.emails == []
        account = _account(email)
        assert account is not None and account.company_name == winner["company_name"]
        received = [r for r in standin.accepted if r.to == [email]]
        assert len(received) == 1, "exactly one invitation for the contested address"
        assert received[0].reference == f"invitation:{winner['contract_id']}:{email}:0"
        with session_scope() as session:
            accounts = session.exec(select(Account).where(col(Account.email) == email)).all()
            assert len(accounts) == 1


def test_producer_refusal_never_creates_or_rebinds_an_account(worker, standin):
    first = _send_and_deliver(company_name=f"Originale {_suffix()}")
    for name in (f"Autre {_suffix()}", first["company_name"].upper()):
        with pytest.raises(Rejected):
            send_contract(**contract_payload(email=first["email"], company_name=name))
    account = _account(first["email"])
    assert account is not None and account.company_name == first["company_name"]
