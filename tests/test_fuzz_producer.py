"""Bad input at the front door (issue 6, item 4): the Python producer API and the CLI.

Hypothesis draws a valid ``send_contract`` (or ``notify_signatories``,
``cancel_contract``) and breaks one field of it: a value of the wrong type,
control characters (CR/LF, NUL, escape, Unicode line separators, bidi
overrides) inside names, titles and identifiers, huge strings, addresses that
are not addresses. Each call must raise ``Rejected`` with the code the README
names for that field (never another exception), with a one-line message that
does not echo the input, and must leave nothing behind: no contract reserved,
nothing enqueued. The CLI gets the same inputs through ``main()`` in this
process (exit 2, ``code: message`` on stderr, nothing on stdout), and a few
through the real console script, including bytes that are not UTF-8.

Internationalised addresses follow email-validator's defaults (DESIGN §1 uses
it for addresses): UTF-8 local parts and IDN domains are accepted (the domain is
kept in Unicode, lower case) and delivered; addresses with unsafe characters
(invisible spaces, bidi overrides), invalid IDNA labels or spaces are refused
with ``invalid_email``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from contract_dispatch import (
    Rejected,
    cancel_contract,
    contract_status,
    notify_signatories,
    resend_invitation,
    send_contract,
)
from models.account import COMPANY_NAME_MAX_LENGTH, EMAIL_MAX_LENGTH
from models.messages import MAX_SECTIONS, MAX_SIGNATORIES, TEXT_MAX_LENGTH
from models.workspace import IDENTIFIER_MAX_LENGTH
from tests.processes import CLI
from tests.sendgrid_standin import SendGridStandIn
from tests.support import all_emails_sent, contract_payload, wait_for_contract
from workers.cli import main

#: Examples per property: enough to meet every kind of breakage several times,
#: few enough to keep this file well under a minute and a half on both databases.
EXAMPLES = 60

#: One CLI subprocess never takes this long, in seconds.
COMMAND_TIMEOUT_SECONDS = 60

#: Longest refusal message: a sentence, never the (possibly huge) input.
MESSAGE_MAX_LENGTH = 400

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # No example database in the working tree; a failure prints its example and seed.
    database=None,
    # The session-scoped database is shared on purpose: every example uses fresh ids.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


#: Dramatiq's consumer threads, running beside the tests, draw their idle backoff
#: jitter from the global ``random``: Hypothesis takes that for a strategy using it.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

# -- the ingredients of bad input ---------------------------------------------------

#: Characters that must never get inside a name, title or header: C0 and C1
#: controls, Unicode line and paragraph separators, bidi overrides and isolates.
CONTROL_CHARACTERS = (
    "\r",
    "\n",
    "\r\n",
    "\x00",
    "\t",
    "\x0b",
    "\x0c",
    "\x1b",
    "\x7f",
    "\x85",
    "\u2028",
    "\u2029",
    "\u202e",
    "\u2066",
)

#: A header injection attempt, the classic CR/LF payload.
INJECTIONS = ("\r\nBcc: victim@example.com", "\nSubject: hacked", "\r\n\r\n<html>")

#: JSON values of the wrong type for a string field (None is "absent" for optional ones).
wrong_types = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)

#: Ordinary letters, so a control character lands inside a value, not at its trimmed edges.
letters = st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=20)


@st.composite
def with_control_character(draw: st.DrawFn) -> str:
    """A value with a control character or a CR/LF injection inside it."""
    middle: str = draw(st.sampled_from(CONTROL_CHARACTERS + INJECTIONS))
    head: str = draw(letters)
    tail: str = draw(letters)
    return head + middle + tail


def huge_string(minimum: int) -> st.SearchStrategy[str]:
    """One character repeated past ``minimum`` (up to a megabyte): fast to draw, big to carry."""
    return st.builds(
        lambda char, extra: char * (minimum + extra),
        st.sampled_from("aZé字-"),
        st.sampled_from([1, 1000, 100_000, 1_000_000]),
    )


#: Strings that are not email addresses under any reading.
INVALID_EMAILS = (
    "",
    "   ",
    "plainaddress",
    "@example.com",
    "client@",
    "client@@example.com",
    "client@exa@mple.com",
    "client@example",
    "client@example..com",
    "client.@example.com",
    ".client@example.com",
    "cli ent@example.com",
    "client@exa mple.com",
    '"client"@example.com',
    "Client <client@example.com>",
    "client@[127.0.0.1]",
    "client@-example.com",
    "client@example.com\r\nBcc: victim@example.com",
    "client\n@example.com",
    "cli\x00ent@example.com",
    "cli\u200bent@example.com",
    "cli\u202eent@example.com",
    "cli\u00a0ent@example.com",
    "client@xn--zz.com",
    "client@" + "a" * 64 + ".com",
    "a" * 250 + "@example.com",
)


@st.composite
def invalid_email(draw: st.DrawFn) -> str:
    """A known-bad address, random text without an @, or a good one with a control character inside."""
    kind = draw(st.sampled_from(["known", "no_at", "control", "huge"]))
    if kind == "known":
        return draw(st.sampled_from(INVALID_EMAILS))
    if kind == "no_at":
        return draw(st.text(min_size=1, max_size=80).filter(lambda text: "@" not in text))
    if kind == "control":
        head: str = draw(letters)
        middle: str = draw(st.sampled_from(CONTROL_CHARACTERS + INJECTIONS))
        return head + middle + "x@example.com"
    huge: str = draw(huge_string(EMAIL_MAX_LENGTH + 64))
    return huge + "@example.com"


def bad_text(maximum: int) -> st.SearchStrategy[Any]:
    """What breaks a free-text field of at most ``maximum`` characters."""
    return st.one_of(wrong_types, with_control_character(), huge_string(maximum * 4), st.just("   "))


def bad_identifier() -> st.SearchStrategy[Any]:
    """What breaks an identifier: wrong types, controls, huge, or characters outside its alphabet."""
    outside_alphabet = st.builds(
        lambda head, bad, tail: head + bad + tail,
        letters,
        # Not "..": dots are in the alphabet, so "a..b" is a valid identifier; a
        # path that climbs is refused for its leading dot (below) and its "/".
        st.sampled_from(["/", " ", ":", "é", "<", "'", "%", "\\", "@"]),
        letters,
    )
    return st.one_of(
        wrong_types,
        with_control_character(),
        huge_string(IDENTIFIER_MAX_LENGTH),
        outside_alphabet,
        st.just(""),
        st.just("-leading-dash"),
        st.just("../etc/passwd"),
    )


# -- send_contract: one field broken, the code that field names --------------------


@dataclass(frozen=True)
class Breakage:
    """One field of a valid payload replaced by ``value``; ``code`` is the refusal expected."""

    field: str
    value: Any
    code: str

    def apply(self, payload: dict[str, Any]) -> dict[str, Any]:
        broken = dict(payload)
        broken[self.field] = self.value
        return broken


def _breakages(field: str, values: st.SearchStrategy[Any], code: str) -> st.SearchStrategy[Breakage]:
    return values.map(lambda value: Breakage(field, value, code))


def _code_by_type(value_code: str) -> Callable[[Any], str]:
    """A value of the wrong JSON type is a malformed payload; a wrong string is the field's own code."""
    return lambda value: value_code if isinstance(value, str) else "invalid_payload"


def _typed(field: str, values: st.SearchStrategy[Any], value_code: str) -> st.SearchStrategy[Breakage]:
    code_of = _code_by_type(value_code)
    return values.map(lambda value: Breakage(field, value, code_of(value)))


def _signatories_breakage() -> st.SearchStrategy[Breakage]:
    good = {"email": "manager@example.com", "name": "Claire"}
    return st.one_of(
        _breakages(
            "signatories",
            st.sampled_from([[], "manager@example.com", 5, {"email": "m@x.com"}]),
            "invalid_payload",
        ),
        _breakages("signatories", st.just([good] * (MAX_SIGNATORIES + 1)), "invalid_payload"),
        _breakages("signatories", st.just([good, dict(good)]), "invalid_payload"),  # the same manager twice
        _breakages("signatories", wrong_types.map(lambda v: [v]), "invalid_payload"),
        _breakages("signatories", st.just([{"name": "No Email"}]), "invalid_payload"),
        _breakages(
            "signatories",
            st.text(min_size=1, max_size=30).map(lambda k: [{**good, f"x{k}": 1}]),
            "invalid_payload",
        ),
        _breakages("signatories", invalid_email().map(lambda e: [{"email": e}]), "invalid_email"),
        _breakages(
            "signatories", bad_text(TEXT_MAX_LENGTH).map(lambda n: [{**good, "name": n}]), "invalid_payload"
        ),
    )


def _sections_breakage() -> st.SearchStrategy[Breakage]:
    return st.one_of(
        _breakages("sections", st.sampled_from([[], "conditions", 3, {"id": "x"}]), "invalid_payload"),
        _breakages(
            "sections", st.just([{"id": f"s{n}"} for n in range(MAX_SECTIONS + 1)]), "invalid_payload"
        ),
        _breakages("sections", st.just([{"id": "a"}, {"id": "a"}]), "invalid_payload"),
        _breakages("sections", bad_identifier().map(lambda i: [{"id": i}]), "invalid_payload"),
        _breakages(
            "sections", bad_text(TEXT_MAX_LENGTH).map(lambda t: [{"id": "a", "title": t}]), "invalid_payload"
        ),
        _breakages(
            "sections",
            st.text(min_size=1, max_size=30).map(lambda k: [{"id": "a", f"x{k}": True}]),
            "invalid_payload",
        ),
    )


send_contract_breakages: st.SearchStrategy[Breakage] = st.one_of(
    _breakages("contract_id", bad_identifier(), "invalid_payload"),
    _breakages("workspace_id", bad_identifier(), "invalid_payload"),
    _breakages("resource_group_id", bad_identifier(), "invalid_payload"),
    _typed("email", st.one_of(invalid_email(), wrong_types), "invalid_email"),
    _typed(
        "company_name",
        st.one_of(
            with_control_character(), huge_string(COMPANY_NAME_MAX_LENGTH * 4), st.just(" \t "), wrong_types
        ),
        "invalid_company_name",
    ),
    # The lead source is an enumeration: any other value, of any type, is that field's error.
    _breakages(
        "lead_source",
        st.one_of(st.sampled_from(["BAP", "Network", "", "bap ", "marketplace"]), wrong_types),
        "invalid_lead_source",
    ),
    _breakages("title", bad_text(TEXT_MAX_LENGTH), "invalid_payload"),
    _breakages(
        "locale", st.one_of(st.sampled_from(["de", "FR", "", "fr_FR"]), wrong_types), "invalid_payload"
    ),
    _signatories_breakage(),
    _sections_breakage(),
)

_PRODUCER_ARGUMENTS = {
    "contract_id": "contract_id",
    "email": "email",
    "company_name": "company_name",
    "lead_source": "lead_source",
    "workspace_id": "workspace_id",
    "resource_group_id": "resource_group_id",
    "signatories": "signatories",
    "sections": "sections",
    "title": "title",
    "locale": "locale",
}


def assert_clear_refusal(refusal: Rejected, code: str) -> None:
    """The code expected, and a short one-line message (it is printed and stored as is)."""
    assert refusal.code == code, f"{refusal.code}: {refusal.message}"
    assert refusal.message.strip(), "a refusal must say why"
    assert len(refusal.message) <= MESSAGE_MAX_LENGTH, refusal.message[:500]
    assert "\n" not in refusal.message and "\r" not in refusal.message and "\x00" not in refusal.message


@FUZZ
@given(breakage=send_contract_breakages)
# Not lists: list() would crash on these, or split a string into one item per character.
@example(breakage=Breakage("signatories", None, "invalid_payload"))
@example(breakage=Breakage("signatories", 5, "invalid_payload"))
@example(breakage=Breakage("sections", "tarifs", "invalid_payload"))
def test_producer_send_contract_refuses_bad_input_with_its_code(database: str, breakage: Breakage) -> None:
    payload = breakage.apply(contract_payload())
    contract_id = payload["contract_id"]
    with pytest.raises(Rejected) as refused:
        send_contract(
            **{argument: payload[key] for key, argument in _PRODUCER_ARGUMENTS.items() if key in payload}
        )
    assert_clear_refusal(refused.value, breakage.code)
    # Nothing reserved, so nothing enqueued (the reservation comes before the enqueue).
    if isinstance(contract_id, str) and len(contract_id) <= IDENTIFIER_MAX_LENGTH:
        assert contract_status(contract_id) is None


notify_breakages: st.SearchStrategy[Breakage] = st.one_of(
    _breakages("contract_id", bad_identifier(), "invalid_payload"),
    _typed(
        "legal_name",
        st.one_of(with_control_character(), huge_string(COMPANY_NAME_MAX_LENGTH * 4), wrong_types),
        "invalid_company_name",
    ),
    _breakages(
        "accepted_sections",
        st.one_of(
            st.just([]),
            st.just("conditions"),
            st.integers(),
            bad_identifier().map(lambda i: [i]),
            st.just(["a"] * (MAX_SECTIONS + 1)),
        ),
        "invalid_payload",
    ),
    _breakages(
        "registration_number",
        st.one_of(with_control_character(), huge_string(64), wrong_types, st.just("12;DROP")),
        "invalid_payload",
    ),
    _breakages("signer_name", bad_text(TEXT_MAX_LENGTH), "invalid_payload"),
)


@FUZZ
@given(breakage=notify_breakages)
@example(breakage=Breakage("accepted_sections", "conditions", "invalid_payload"))
@example(breakage=Breakage("accepted_sections", None, "invalid_payload"))
def test_producer_notify_signatories_refuses_bad_input_with_its_code(
    database: str, breakage: Breakage
) -> None:
    payload = breakage.apply(
        {
            "contract_id": f"c-{uuid.uuid4().hex[:10]}",
            "legal_name": "Dupont SARL",
            "accepted_sections": ["conditions"],
            "registration_number": "123 456 789",
            "signer_name": "Camille",
        }
    )
    with pytest.raises(Rejected) as refused:
        notify_signatories(**payload)
    assert_clear_refusal(refused.value, breakage.code)


@FUZZ
@given(
    breakage=st.one_of(
        _breakages("contract_id", bad_identifier(), "invalid_payload"),
        _breakages(
            "reason", st.one_of(wrong_types, with_control_character(), huge_string(2000)), "invalid_payload"
        ),
    )
)
def test_producer_cancel_contract_refuses_bad_input_with_its_code(database: str, breakage: Breakage) -> None:
    payload = breakage.apply({"contract_id": f"c-{uuid.uuid4().hex[:10]}", "reason": "changed plans"})
    with pytest.raises(Rejected) as refused:
        cancel_contract(**payload)
    assert_clear_refusal(refused.value, breakage.code)


@FUZZ
@given(contract_id=bad_identifier())
def test_producer_lookups_by_a_bad_contract_id_skip_the_database(database: str, contract_id: Any) -> None:
    # No contract can have such an id; PostgreSQL would refuse some (a NUL) as a parameter.
    assert contract_status(contract_id) is None
    with pytest.raises(Rejected) as refused:
        resend_invitation(contract_id)
    assert_clear_refusal(refused.value, "invalid_payload")


def test_well_formed_messages_for_unknown_contracts_are_refused_by_name(database: str) -> None:
    contract_id = f"c-{uuid.uuid4().hex[:10]}"
    with pytest.raises(Rejected) as refused:
        notify_signatories(contract_id=contract_id, legal_name="Dupont SARL", accepted_sections=["a"])
    assert_clear_refusal(refused.value, "unknown_contract")
    with pytest.raises(Rejected) as refused:
        cancel_contract(contract_id=contract_id)
    assert_clear_refusal(refused.value, "unknown_contract")


# -- internationalised addresses -----------------------------------------------------

#: Accepted by email-validator's defaults: UTF-8 local parts (SMTPUTF8) and IDN
#: domains, the latter kept in Unicode and lower case (punycode is decoded).
ACCEPTED_INTERNATIONAL = {
    "josé@exämple.com": "josé@exämple.com",
    "用户@例子.广告": "用户@例子.广告",
    "Δοκιμή@Παράδειγμα.δοκιμή": "Δοκιμή@παράδειγμα.δοκιμή",
    "client@XN--BCHER-KVA.de": "client@bücher.de",
}

#: Refused: invisible or direction-changing characters, spaces, broken IDNA labels.
REFUSED_INTERNATIONAL = (
    "jo\u200bsé@exämple.com",
    "jo\u202esé@exämple.com",
    "josé@exä mple.com",
    "josé@xn--zz.com",
    "josé@exämple..com",
    "josé@-exämple.com",
)


def test_internationalised_addresses_are_delivered_or_refused_by_name(
    database: str, worker: Any, standin: SendGridStandIn
) -> None:
    for address in REFUSED_INTERNATIONAL:
        payload = contract_payload(email=address)
        with pytest.raises(Rejected) as refused:
            send_contract(**payload)
        assert_clear_refusal(refused.value, "invalid_email")
        assert contract_status(payload["contract_id"]) is None

    sent: dict[str, str] = {}
    for typed, normalised in ACCEPTED_INTERNATIONAL.items():
        # A fresh local part per run keeps each address unbound (rule 4).
        local, domain = typed.split("@")
        suffix = uuid.uuid4().hex[:6]
        payload = contract_payload(email=f"{local}{suffix}@{domain}")
        assert send_contract(**payload).status == "queued"
        sent[payload["contract_id"]] = f"{normalised.split('@')[0]}{suffix}@{normalised.split('@')[1]}"
    for contract_id, address in sent.items():
        report = wait_for_contract(contract_id, all_emails_sent(1), what=f"the invitation to {address}")
        assert report.emails[0].to == address
        (received,) = standin.accepted_for(f"invitation:{contract_id}:")
        assert received.to == [address]


# -- the CLI, in this process ----------------------------------------------------------


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def run_main(argv: list[str]) -> Outcome:
    """``contract-dispatch ARGV`` in this process: exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as usage:  # argparse refuses bad usage with SystemExit(2)
            code = usage.code if isinstance(usage.code, int) else 2
    return Outcome(code, out.getvalue(), err.getvalue())


def send_contract_argv(payload: dict[str, Any]) -> list[str]:
    """The send-contract command line of a payload (``--opt=value``: values may start with a dash)."""
    argv = [
        "send-contract",
        f"--contract-id={payload['contract_id']}",
        f"--email={payload['email']}",
        f"--company={payload['company_name']}",
        f"--lead-source={payload['lead_source']}",
        f"--workspace={payload['workspace_id']}",
    ]
    argv += [f"--signatory={s['email']}:{s.get('name', '')}" for s in payload["signatories"]]
    argv += [f"--section={s['id']}:{s.get('title', '')}" for s in payload["sections"]]
    if payload.get("title") is not None:
        argv.append(f"--title={payload['title']}")
    return argv


#: Fields the CLI takes as free strings (its parser checks lead source and locale itself).
_CLI_FIELDS = {
    "contract_id": bad_identifier,
    "workspace_id": bad_identifier,
    "email": invalid_email,
    "company_name": lambda: st.one_of(with_control_character(), huge_string(COMPANY_NAME_MAX_LENGTH * 4)),
    "title": lambda: st.one_of(with_control_character(), huge_string(TEXT_MAX_LENGTH * 4)),
}
_CLI_CODES = {"email": "invalid_email", "company_name": "invalid_company_name"}


@st.composite
def cli_breakage(draw: st.DrawFn) -> Breakage:
    field = draw(st.sampled_from(sorted(_CLI_FIELDS)))
    value = draw(_CLI_FIELDS[field]().filter(lambda v: isinstance(v, str)))
    return Breakage(field, value, _CLI_CODES.get(field, "invalid_payload"))


def assert_cli_refusal(outcome: Outcome, code: str) -> None:
    assert outcome.code == 2, outcome
    assert outcome.stdout == "", outcome.stdout[:300]
    line = outcome.stderr.rstrip("\n")
    assert "\n" not in line, f"one line expected: {line[:500]!r}"
    assert line.startswith(f"{code}: "), line[:300]
    assert len(line) <= MESSAGE_MAX_LENGTH + len(code) + 2, line[:500]


@FUZZ
@given(breakage=cli_breakage())
def test_cli_send_contract_refuses_bad_input_with_exit_2(database: str, breakage: Breakage) -> None:
    payload = breakage.apply(contract_payload())
    outcome = run_main(send_contract_argv(payload))
    assert_cli_refusal(outcome, breakage.code)
    if len(payload["contract_id"]) <= IDENTIFIER_MAX_LENGTH:
        assert contract_status(payload["contract_id"]) is None


#: notify-signatories and cancel-contract options, and the refusal a bad string in each gets.
_CLI_OTHER_OPTIONS = {
    "--contract-id": ("invalid_payload", bad_identifier),
    "--legal-name": (
        "invalid_company_name",
        lambda: st.one_of(with_control_character(), huge_string(COMPANY_NAME_MAX_LENGTH * 4)),
    ),
    "--accepted-section": ("invalid_payload", bad_identifier),
    "--registration-number": (
        "invalid_payload",
        lambda: st.one_of(with_control_character(), st.just("12;DROP")),
    ),
    "--signer-name": ("invalid_payload", lambda: bad_text(TEXT_MAX_LENGTH)),
    "--reason": ("invalid_payload", lambda: st.one_of(with_control_character(), huge_string(2000))),
}


@st.composite
def other_cli_breakage(draw: st.DrawFn) -> tuple[list[str], str]:
    """A notify-signatories or cancel-contract command line with one bad value, and its code."""
    option = draw(st.sampled_from(sorted(_CLI_OTHER_OPTIONS)))
    code, values = _CLI_OTHER_OPTIONS[option]
    value: str = draw(values().filter(lambda v: isinstance(v, str)))
    options = {"--contract-id": f"c-{uuid.uuid4().hex[:10]}", option: value}
    if option == "--reason" or (option == "--contract-id" and draw(st.booleans())):
        command = "cancel-contract"
    else:
        command = "notify-signatories"
        options = {"--legal-name": "Dupont SARL", "--accepted-section": "conditions", **options}
    return [command, *(f"{name}={text}" for name, text in options.items())], code


@FUZZ
@given(case=other_cli_breakage())
def test_cli_notify_and_cancel_refuse_bad_input_with_exit_2(
    database: str, case: tuple[list[str], str]
) -> None:
    argv, code = case
    assert_cli_refusal(run_main(argv), code)


@FUZZ
@given(
    option=st.sampled_from(["--lead-source", "--locale"]),
    value=st.one_of(st.sampled_from(["BAP", "", "de", "fr\n"]), letters),
)
def test_cli_usage_errors_exit_2_without_enqueueing(database: str, option: str, value: str) -> None:
    payload = contract_payload()
    argv = [*send_contract_argv(payload), f"{option}={value}"]
    if value in (("bap", "network", "other") if option == "--lead-source" else ("fr", "en")):
        return
    outcome = run_main(argv)
    assert outcome.code == 2, outcome
    assert "invalid choice" in outcome.stderr
    assert outcome.stdout == ""
    assert contract_status(payload["contract_id"]) is None


@FUZZ
@given(
    missing=st.sampled_from(
        ["--contract-id", "--email", "--company", "--lead-source", "--workspace", "--signatory", "--section"]
    )
)
def test_cli_missing_options_exit_2(database: str, missing: str) -> None:
    payload = contract_payload()
    argv = [arg for arg in send_contract_argv(payload) if not arg.startswith(f"{missing}=")]
    outcome = run_main(argv)
    assert outcome.code == 2, outcome
    assert "required" in outcome.stderr and missing in outcome.stderr
    assert contract_status(payload["contract_id"]) is None


# -- the CLI as a real process -------------------------------------------------------------


def run_cli(env: dict[str, str], argv: list[str | bytes]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CLI, *argv], env=env, capture_output=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False
    )


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("company_name", "Dupont\r\nSARL", "invalid_company_name"),
        ("email", "client@example.com\r\nBcc: victim@example.com", "invalid_email"),
        ("email", "x" * 100_000 + "@example.com", "invalid_email"),
        ("title", "Bureau\x1b[31m rouge", "invalid_payload"),
        # Bytes that are not UTF-8: Python reads them as lone surrogates.
        ("company_name", b"Dupont \xff\xfe SARL", "invalid_company_name"),
        ("email", b"cli\xc3ent@example.com", "invalid_email"),
    ],
)
def test_cli_process_refuses_bad_input_with_exit_2(
    test_environment: dict[str, str], database: str, field: str, value: str | bytes, code: str
) -> None:
    env = {**os.environ, **test_environment, "DATABASE_URL": database}
    payload = contract_payload()
    argv: list[str | bytes] = list(send_contract_argv({**payload, field: "PLACEHOLDER"}))
    option = {"company_name": "--company", "email": "--email", "title": "--title"}[field]
    argv = [
        (f"{option}=".encode() + value if isinstance(value, bytes) else f"{option}={value}")
        if isinstance(arg, str) and arg == f"{option}=PLACEHOLDER"
        else arg
        for arg in argv
    ]
    result = run_cli(env, argv)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr[:500]
    assert result.stdout == b""
    assert stderr.startswith(f"{code}: ") and stderr.count("\n") == 1, stderr[:500]
    assert "Traceback" not in stderr
    assert contract_status(payload["contract_id"]) is None


@pytest.mark.parametrize(
    ("field", "limit"),
    [("company_name", COMPANY_NAME_MAX_LENGTH), ("title", TEXT_MAX_LENGTH), ("email", EMAIL_MAX_LENGTH)],
)
@pytest.mark.parametrize("excess", [1, 10_000])
def test_a_refusal_for_length_names_the_real_limit(field, limit, excess):
    """A huge value is cut short by a guard of a multiple of the limit; the refusal
    still names the limit itself, not the guard's."""
    from models.messages import SendContract, parse_message

    filler = "a" * (limit + excess)
    value = filler[: -len("@example.com")] + "@example.com" if field == "email" else filler
    with pytest.raises(Rejected) as caught:
        parse_message(SendContract, {**contract_payload(), field: value})
    # (email-validator counts the characters too many itself.)
    assert str(limit) in caught.value.message or "too long" in caught.value.message, caught.value.message
    assert not re.search(r"\b(318|800)\b", caught.value.message), caught.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", b"client@example.com"),
        ("company_name", b"Atelier Martin SARL"),
        ("contract_id", bytearray(b"C-1001")),
        ("title", b"Bureau"),
        ("version", True),
    ],
)
def test_values_python_would_convert_are_wrong_types(field: str, value: Any) -> None:
    """Bytes are not text (in which encoding?), and True is not the version 1 it equals.

    Through the validation every way in shares (the API, the CLI, the actors).
    """
    from models.messages import SendContract, parse_message

    with pytest.raises(Rejected) as refused:
        parse_message(SendContract, {**contract_payload(), field: value})
    assert refused.value.code == "invalid_payload", refused.value
