"""The ``contract-dispatch`` command line, driven as a subprocess the way scripts
outside this repository drive it.

Every command runs the console script installed next to this interpreter, with
the session's environment and the database under test; the in-process
``worker`` fixture processes what the commands enqueue. Conventions checked:
success exits 0 (send and notify print exactly one JSON receipt on stdout), a
refusal exits 2 with ``code: message`` on stderr and nothing on stdout, an
unknown contract in ``contract-status`` exits 1.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from jsonschema import Draft202012Validator

import workers.cli_bulk
from tests.processes import CLI, COMMAND_TIMEOUT_SECONDS, describe, run_cli
from tests.support import (
    all_emails_sent,
    contract_payload,
    forget_namespace,
    send_args,
    unique,
    wait_for_contract,
    wait_until,
)

#: How long a test waits for the worker to move a contract on.
STATUS_TIMEOUT_SECONDS = 30

STATUS_KEYS = {"contract_id", "status", "error", "emails"}
EMAIL_KEYS = {"kind", "to", "status", "attempts", "provider_message_id"}


@dataclass
class Cli:
    """Runs ``contract-dispatch`` with one environment."""

    env: dict[str, str]

    def __call__(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args, stdin=stdin)

    def status(self, contract_id: str) -> dict[str, Any] | None:
        """``contract-status ID --json``, or None when the contract is unknown."""
        result = self("contract-status", contract_id, "--json")
        if result.returncode == 1:
            return None
        assert result.returncode == 0, describe(result)
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def wait_status(
        self, contract_id: str, done: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """Wait until ``done`` holds of ``contract-status --json``; return that report.

        Polled in this process, through the function the command prints (each CLI
        start costs a second of CPU), then asked of the command once.
        """
        from contract_dispatch import contract_status
        from workers.cli_contract_status import status_json

        def check() -> bool:
            report = contract_status(contract_id)
            return report is not None and done(json.loads(json.dumps(status_json(report), default=str)))

        wait_until(check, timeout=STATUS_TIMEOUT_SECONDS, what=what)
        report = self.status(contract_id)
        assert report is not None and done(report), report
        return report


def emails_sent(kind: str, count: int) -> Callable[[dict[str, Any]], bool]:
    """``done`` for ``wait_status``: exactly ``count`` emails of ``kind``, all sent."""

    def check(report: dict[str, Any]) -> bool:
        emails = [email for email in report["emails"] if email["kind"] == kind]
        return len(emails) == count and all(email["status"] == "sent" for email in emails)

    return check


def assert_receipt(result: subprocess.CompletedProcess[str], contract_id: str) -> None:
    """Exit 0 and stdout is exactly the one-object receipt."""
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout) == {"contract_id": contract_id, "status": "queued"}, describe(result)
    assert len(result.stdout.strip().splitlines()) == 1, describe(result)


def assert_refused(result: subprocess.CompletedProcess[str], code: str) -> str:
    """Exit 2, nothing on stdout, ``code: message`` on stderr; returns the message."""
    assert result.returncode == 2, describe(result)
    assert result.stdout == "", describe(result)
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{code}: ")]
    assert lines, f"no '{code}: ...' line on stderr\n{describe(result)}"
    message = lines[0].removeprefix(f"{code}: ").strip()
    assert len(message) > 10, describe(result)
    return message


def assert_not_queued(contract_id: str) -> None:
    """A refused send leaves no queued contract behind."""
    from contract_dispatch import contract_status

    report = contract_status(contract_id)
    assert report is None or report.status == "rejected", report


def wait_for_invitation(contract_id: str) -> None:
    """Wait (in process, faster than polling the CLI) until the invitation is sent."""
    wait_for_contract(contract_id, all_emails_sent(1), what=f"the invitation of {contract_id}")


def stored_contract(contract_id: str) -> Any:
    from models.contract import Contract
    from workers.database import session_scope

    with session_scope() as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        session.expunge(contract)
        return contract


def resource_groups(workspace_id: str) -> list[str] | None:
    from models.workspace import resource_groups_of
    from workers.database import session_scope

    with session_scope() as session:
        return resource_groups_of(session, workspace_id)


@pytest.fixture
def cli(
    test_environment: dict[str, str], database: str, request: pytest.FixtureRequest, redis_server: Any
) -> Iterator[Cli]:
    """The CLI on the database under test (the one the ``worker`` fixture uses).

    A test that runs no worker sends into a Redis namespace of its own, dropped
    afterwards: a message it left in the worker's namespace would be processed
    later, into whichever database a later test had made this process's.
    """
    env = {**os.environ, **test_environment, "DATABASE_URL": database}
    if "worker" in request.fixturenames:
        yield Cli(env)
        return
    env["REDIS_NAMESPACE"] = unique("cli")
    try:
        yield Cli(env)
    finally:
        forget_namespace(redis_server.client(), env["REDIS_NAMESPACE"])


@pytest.fixture
def cli_without_database(test_environment: dict[str, str]) -> Cli:
    """The CLI for commands that never reach the database."""
    return Cli({**os.environ, **test_environment})


# -- workspace set -------------------------------------------------------------


def test_workspace_set_creates_then_replaces_resource_groups(cli, worker, standin):
    workspace = unique("ws")
    created = cli("workspace", "set", workspace, "--resource-group", "paris", "--resource-group", "lyon")
    assert created.returncode == 0, describe(created)
    assert resource_groups(workspace) == ["lyon", "paris"]

    payload = contract_payload(workspace_id=workspace)
    assert_refused(cli(*send_args(payload)), "resource_group_required")

    replaced = cli("workspace", "set", workspace, "--resource-group", "nantes")
    assert replaced.returncode == 0, describe(replaced)
    assert resource_groups(workspace) == ["nantes"]

    stale = contract_payload(workspace_id=workspace, resource_group_id="paris")
    assert_refused(cli(*send_args(stale)), "unknown_resource_group")
    assert_not_queued(stale["contract_id"])

    # One group left: it no longer has to be named, and is the one recorded.
    assert_receipt(cli(*send_args(payload)), payload["contract_id"])
    wait_for_invitation(payload["contract_id"])
    assert stored_contract(payload["contract_id"]).resource_group_id == "nantes"


def test_workspace_set_requires_a_resource_group(cli):
    result = cli("workspace", "set", unique("ws"))
    assert result.returncode == 2, describe(result)
    assert "--resource-group" in result.stderr


def test_workspace_set_says_which_identifier_rule_is_broken(cli):
    too_long = cli("workspace", "set", "w" * 200, "--resource-group", "rg-1")
    assert too_long.returncode == 2, describe(too_long)
    assert "is 200 characters long; an identifier has at most 128" in too_long.stderr, describe(too_long)
    bad = cli("workspace", "set", unique("ws"), "--resource-group", "rg/1")
    assert bad.returncode == 2, describe(bad)
    assert "'rg/1' is not a valid identifier" in bad.stderr, describe(bad)


def test_workspace_list_and_show_read_what_set_wrote(cli):
    workspace = unique("ws")
    assert (
        cli("workspace", "set", workspace, "--resource-group", "paris", "--resource-group", "lyon").returncode
        == 0
    )

    shown = cli("workspace", "show", workspace)
    assert shown.returncode == 0, describe(shown)
    assert json.loads(shown.stdout) == {"workspace_id": workspace, "resource_groups": ["lyon", "paris"]}

    listed = cli("workspace", "list", "--json")
    assert listed.returncode == 0, describe(listed)
    registered = json.loads(listed.stdout)
    ids = [item["workspace_id"] for item in registered]
    assert ids == sorted(ids) and {"ws-main", "ws-multi", workspace} <= set(ids), ids
    assert {"workspace_id": workspace, "resource_groups": ["lyon", "paris"]} in registered

    text = cli("workspace", "list")
    assert text.returncode == 0, describe(text)
    assert f"{workspace}: lyon, paris" in text.stdout.splitlines(), describe(text)
    assert text.stderr == f"{len(registered)} workspaces\n", describe(text)

    unknown = cli("workspace", "show", "ws-never-set")
    assert unknown.returncode == 1, describe(unknown)
    assert unknown.stdout == ""
    assert unknown.stderr == "unknown_workspace: workspace 'ws-never-set' is not registered\n"


# -- send-contract ---------------------------------------------------------------


def test_send_contract_prints_one_receipt_and_records_every_flag(cli, worker, standin):
    contract_id = unique("c")
    email = f"{unique('client')}@example.com"
    result = cli(
        "send-contract",
        "--contract-id",
        contract_id,
        "--email",
        email,
        "--company",
        "Atelier Durand SAS",
        "--lead-source",
        "bap",
        "--workspace",
        "ws-multi",
        "--resource-group",
        "lyon",
        "--signatory",
        "boss@example.com:Claire Boss: Direction",
        "--signatory",
        "ops@example.com",
        "--section",
        "conditions:Conditions générales: version 2",
        "--section",
        "tarifs",
        "--title",
        "Open space, 6 desks",
        "--locale",
        "en",
    )
    assert_receipt(result, contract_id)

    wait_for_invitation(contract_id)
    contract = stored_contract(contract_id)
    assert contract.status == "sent"
    assert contract.lead_source == "bap"
    assert contract.resource_group_id == "lyon"
    assert contract.locale == "en"
    assert contract.signatories == [
        {"email": "boss@example.com", "name": "Claire Boss: Direction"},
        {"email": "ops@example.com"},
    ]
    assert contract.sections == [
        {"id": "conditions", "title": "Conditions générales: version 2"},
        {"id": "tarifs"},
    ]

    (invitation,) = standin.accepted_for(f"invitation:{contract_id}:")
    assert invitation.to == [email]
    text = invitation.content("text/plain")
    assert "Open space, 6 desks" in text
    assert "Hello" in text  # --locale en
    assert f"https://app.example.com/contracts/{contract_id}" in text


def test_send_contract_refuses_a_binding_mismatch(cli, worker, standin):
    first = contract_payload(company_name="Dupont Conseil SARL")
    assert_receipt(cli(*send_args(first)), first["contract_id"])
    wait_for_invitation(first["contract_id"])

    by_case = contract_payload(email=first["email"], company_name="DUPONT CONSEIL SARL")
    message = assert_refused(cli(*send_args(by_case)), "email_bound_to_other_company")
    assert "case" in message
    assert "Dupont Conseil SARL" not in message
    assert_not_queued(by_case["contract_id"])

    other = contract_payload(email=first["email"], company_name="Martin Immobilier SA")
    message = assert_refused(cli(*send_args(other)), "email_bound_to_other_company")
    assert "Dupont" not in message
    assert "DUPONT" not in message
    assert_not_queued(other["contract_id"])

    again = contract_payload(email=first["email"], company_name="  Dupont Conseil SARL ")
    assert_receipt(cli(*send_args(again)), again["contract_id"])


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"email": "not-an-email"}, "invalid_email"),
        ({"email": "client@"}, "invalid_email"),
        ({"workspace_id": "ws-multi", "resource_group_id": "marseille"}, "unknown_resource_group"),
        ({"workspace_id": "ws-multi"}, "resource_group_required"),
        ({"company_name": "Evil\r\nBcc: x@example.com"}, "invalid_company_name"),
    ],
    ids=["no-at", "no-domain", "unknown-group", "group-missing", "control-chars"],
)
def test_send_contract_refuses_bad_input(cli, overrides, code):
    payload = contract_payload(**overrides)
    assert_refused(cli(*send_args(payload)), code)
    assert_not_queued(payload["contract_id"])


@pytest.mark.parametrize(
    "flag",
    ["--contract-id", "--email", "--company", "--lead-source", "--workspace", "--signatory", "--section"],
)
def test_send_contract_requires_each_flag(cli_without_database, flag):
    args = send_args(contract_payload())
    while flag in args:
        position = args.index(flag)
        del args[position : position + 2]
    result = cli_without_database(*args)
    assert result.returncode == 2, describe(result)
    assert result.stdout == ""
    assert flag in result.stderr


def test_send_contract_refuses_an_unknown_lead_source(cli_without_database):
    result = cli_without_database(*send_args(contract_payload(lead_source="salon")))
    assert result.returncode == 2, describe(result)
    assert result.stdout == ""
    assert "--lead-source" in result.stderr
    assert "salon" in result.stderr


# -- notify-signatories ------------------------------------------------------------


def test_notify_signatories_conventions(cli, worker, standin):
    payload = contract_payload()
    contract_id = payload["contract_id"]
    assert_receipt(cli(*send_args(payload)), contract_id)
    wait_for_invitation(contract_id)

    partial = cli(
        "notify-signatories",
        "--contract-id",
        contract_id,
        "--legal-name",
        payload["company_name"],
        "--accepted-section",
        "conditions",
    )
    message = assert_refused(partial, "sections_not_all_accepted")
    assert "tarifs" in message
    assert cli.status(contract_id)["status"] == "sent"

    unknown = unique("c")
    missing = cli(
        "notify-signatories",
        "--contract-id",
        unknown,
        "--legal-name",
        "Nobody SA",
        "--accepted-section",
        "conditions",
    )
    assert_refused(missing, "unknown_contract")
    assert cli.status(unknown) is None

    signed = cli(
        "notify-signatories",
        "--contract-id",
        contract_id,
        "--legal-name",
        payload["company_name"],
        "--accepted-section",
        "conditions",
        "--accepted-section",
        "tarifs",
    )
    assert_receipt(signed, contract_id)
    report = wait_for_contract(
        contract_id,
        lambda r: r.status == "signed" and all_emails_sent(2)(r),
        what="the signatory to be told",
    )
    assert report.error is None
    assert [e.kind for e in report.emails] == ["invitation", "signed_notification"]


def test_notify_signatories_requires_an_accepted_section(cli_without_database):
    result = cli_without_database(
        "notify-signatories", "--contract-id", unique("c"), "--legal-name", "Dupont SARL"
    )
    assert result.returncode == 2, describe(result)
    assert result.stdout == ""
    assert "--accepted-section" in result.stderr


# -- contract-status ---------------------------------------------------------------


def test_contract_status_json_and_human_output(cli, worker, standin):
    payload = contract_payload()
    contract_id = payload["contract_id"]
    assert_receipt(cli(*send_args(payload)), contract_id)
    wait_for_invitation(contract_id)
    report = cli.status(contract_id)
    assert report is not None

    assert set(report) >= STATUS_KEYS
    assert report["contract_id"] == contract_id
    assert report["status"] == "sent"
    assert report["error"] is None
    (email,) = report["emails"]
    assert set(email) >= EMAIL_KEYS
    (invitation,) = standin.accepted_for(f"invitation:{contract_id}:")
    assert email["kind"] == "invitation"
    assert email["to"] == payload["email"]
    assert email["status"] == "sent"
    assert email["attempts"] == 1
    assert email["provider_message_id"] == invitation.message_id

    human = cli("contract-status", contract_id)
    assert human.returncode == 0, describe(human)
    assert contract_id in human.stdout
    assert "sent" in human.stdout
    assert "invitation" in human.stdout
    assert payload["email"] in human.stdout
    assert invitation.message_id is not None
    assert invitation.message_id in human.stdout


def test_contract_status_reports_a_rejection(cli, worker):
    import actors

    # Straight onto the queue: the CLI itself would refuse this before enqueueing.
    payload = contract_payload(email="no-at-sign.example.com")
    actors.send_contract.send(payload)
    wait_for_contract(payload["contract_id"], lambda r: r.status == "rejected", what="the rejection")
    report = cli.status(payload["contract_id"])
    assert report is not None
    assert report["status"] == "rejected"
    assert set(report["error"]) == {"code", "message"}
    assert report["error"]["code"] == "invalid_email"
    assert report["error"]["message"]
    assert report["emails"] == []

    human = cli("contract-status", payload["contract_id"])
    assert human.returncode == 0, describe(human)
    assert "rejected" in human.stdout
    assert "invalid_email" in human.stdout


def test_contract_status_of_an_unknown_contract_exits_1(cli, worker):
    contract_id = unique("c")
    for args in (["contract-status", contract_id], ["contract-status", contract_id, "--json"]):
        result = cli(*args)
        assert result.returncode == 1, describe(result)
        assert contract_id in result.stderr
    # The same shape as a known contract's, with nulls (README).
    unknown = json.loads(cli("contract-status", contract_id, "--json").stdout)
    known_payload = contract_payload()
    assert_receipt(cli(*send_args(known_payload)), known_payload["contract_id"])
    known = cli.status(known_payload["contract_id"])
    assert known is not None
    assert list(unknown) == list(known), (unknown, known)
    assert unknown == {
        **dict.fromkeys(known),
        "contract_id": contract_id,
        "error": {"code": "unknown_contract", "message": f"no contract has id {contract_id!r}"},
        "emails": [],
    }
    # No contract can have an id outside the identifier alphabet: unknown, not a database error.
    for bad in ("../etc/passwd", "x" * 200):
        result = cli("contract-status", bad, "--json")
        assert result.returncode == 1, describe(result)
        assert json.loads(result.stdout)["error"]["code"] == "unknown_contract"


def test_contract_status_of_many_ids_answers_one_line_each_in_the_order_asked(cli, worker, standin):
    payloads = [contract_payload() for _ in range(3)]
    for payload in payloads:
        assert_receipt(cli(*send_args(payload)), payload["contract_id"])
    for payload in payloads:
        wait_for_invitation(payload["contract_id"])
    known = [payload["contract_id"] for payload in payloads]
    unknown = unique("c")
    asked = [known[2], unknown, known[0], "../bad id", known[1], known[0]]

    several = cli("contract-status", *asked, "--json")
    assert several.returncode == 1, describe(several)  # one at least is unknown
    answers = [json.loads(line) for line in several.stdout.splitlines()]
    assert [answer["contract_id"] for answer in answers] == asked
    assert [answer["status"] for answer in answers] == ["sent", None, "sent", None, "sent", "sent"]
    assert answers[0] == cli.status(known[2])
    assert answers[1]["error"]["code"] == "unknown_contract"
    assert several.stderr.splitlines() == [
        f"unknown_contract: no contract has id {unknown!r}",
        "unknown_contract: no contract has id '../bad id'",
    ]

    # From stdin, read in groups of 500: the same answers on either side of a group's
    # edge, in order; blank lines skipped.
    from workers.cli_contract_status import STATUS_IDS_PER_READ

    filler = [f"c-none-{number}" for number in range(STATUS_IDS_PER_READ)]
    lines = [*asked, "", *filler, "  ", *asked]
    piped = cli("contract-status", "-", "--json", stdin="\n".join(lines) + "\n")
    assert piped.returncode == 1, describe(piped)
    piped_answers = [json.loads(line) for line in piped.stdout.splitlines()]
    assert len(piped_answers) == 2 * len(asked) + len(filler)
    assert piped_answers[: len(asked)] == answers
    assert piped_answers[-len(asked) :] == answers
    assert [answer["contract_id"] for answer in piped_answers[len(asked) : -len(asked)]] == filler

    alone = cli("contract-status", "-", "--json", stdin=f"{known[1]}\n")
    assert alone.returncode == 0, describe(alone)
    assert len(alone.stdout.splitlines()) == 1 and json.loads(alone.stdout)["contract_id"] == known[1]

    human = cli("contract-status", known[0], known[1])
    assert human.returncode == 0, describe(human)
    assert [line for line in human.stdout.splitlines() if line.startswith("contract ")] == [
        f"contract {known[0]}: sent",
        f"contract {known[1]}: sent",
    ]


def test_contract_statuses_reads_many_contracts_in_two_queries_per_500(database, worker, standin):
    from contract_dispatch import contract_statuses, send_contracts
    from tests.support import recorded_statements

    payloads = [contract_payload() for _ in range(3)]
    send_contracts(payloads)
    ids = [payload["contract_id"] for payload in payloads]
    for contract_id in ids:
        wait_for_invitation(contract_id)
    unknown = unique("c")
    with recorded_statements() as statements:
        reports = contract_statuses([ids[1], unknown, *ids])
    assert list(reports) == [ids[1], unknown, ids[0], ids[2]]
    assert reports[unknown] is None
    assert all(
        report is not None and report.status == "sent" for cid, report in reports.items() if cid != unknown
    )
    reading = [s for s in statements if s.statement.lstrip().upper().startswith("SELECT")]
    assert len(reading) == 2, [s.statement for s in reading]


def test_reading_commands_refuse_a_database_without_our_tables_and_create_nothing(
    cli_without_database, tmp_path
):
    """Opening the file would create it: a typo would read as an empty system, a contract as unknown."""
    missing = tmp_path / "tpyo" / "contract-dispatch.db"
    typo = Cli({**cli_without_database.env, "DATABASE_URL": f"sqlite:///{missing}"})
    said = f"no database at {missing}: nothing was ever recorded there (check DATABASE_URL)"
    for args in (
        ["contract-status", unique("c"), "--json"],
        ["dead-letters", "list"],
        ["dead-letters", "purge", "--older-than", "1d", "--yes"],
        ["lead-sources"],
        ["lead-sources", "--contracts", "sent"],
        ["workspace", "list"],
        ["workspace", "show", "ws-main"],
    ):
        result = typo(*args)
        assert result.returncode == 3, describe(result)
        assert result.stderr == f"unavailable: {said}\n", describe(result)
        assert result.stdout == "", describe(result)
    status = typo("status", "--json")
    assert status.returncode == 3, describe(status)
    errors = json.loads(status.stdout)["errors"]
    database_errors = [error for error in errors if error.startswith("database: ")]
    assert database_errors == [f"database: DatabaseMissing: {said}"], errors
    assert not missing.parent.exists()

    # A file that is there but not ours (empty here): read, never given our tables.
    other = tmp_path / "other.db"
    other.touch()
    elsewhere = Cli({**cli_without_database.env, "DATABASE_URL": f"sqlite:///{other}"})
    for args in (["contract-status", unique("c")], ["dead-letters", "list"], ["status", "--json"]):
        result = elsewhere(*args)
        assert result.returncode == 3, describe(result)
        said = f"no contract-dispatch tables in sqlite file {other} (check DATABASE_URL)"
        assert said in result.stdout + result.stderr, describe(result)
    assert other.stat().st_size == 0


def test_send_contract_to_an_unreachable_broker_leaves_no_contract(cli):
    """Exit 3, and the contract reserved before enqueueing is forgotten again (on both databases)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = Cli({**cli.env, "REDIS_URL": f"redis://127.0.0.1:{closed_port}/0"})
    payload = contract_payload()
    result = unreachable(*send_args(payload))
    assert result.returncode == 3, describe(result)
    assert result.stderr.startswith("unavailable: the message broker cannot be reached"), describe(result)
    status = cli("contract-status", payload["contract_id"])
    assert status.returncode == 1, describe(status)


# -- send-contracts ------------------------------------------------------------------


def json_lines(*items: Any) -> str:
    """Input for ``send-contracts``: each item one line (a str is written as it is)."""
    return "".join(
        (item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)) + "\n" for item in items
    )


def answers(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """``send-contracts --json`` output: one object per non-blank input line."""
    return [json.loads(line) for line in result.stdout.splitlines()]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class _AnyText:
    """Equal to any string long enough to explain something."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) > 5

    def __repr__(self) -> str:
        return "<any text>"


ANY_TEXT: Any = _AnyText()


def test_send_contracts_answers_every_line_in_order_and_sends_the_accepted(cli, worker, standin):
    bound = contract_payload(company_name="Lefebvre Studio SARL")
    assert_receipt(cli(*send_args(bound)), bound["contract_id"])
    wait_for_invitation(bound["contract_id"])

    good = [contract_payload() for _ in range(3)]
    conflicting = contract_payload(email=bound["email"], company_name="Autre Société SA")
    bad_email = contract_payload(email="not-an-email")
    stdin = json_lines(
        good[0],
        "{not json",
        good[1],
        "",
        [good[2]],
        conflicting,
        bad_email,
        good[2],
    )
    result = cli("send-contracts", "--json", "--batch-size", "3", stdin=stdin)

    assert result.returncode == 2, describe(result)
    assert answers(result) == [
        {"line": 1, "contract_id": good[0]["contract_id"], "status": "queued"},
        {"line": 2, "contract_id": None, "error": {"code": "invalid_payload", "message": ANY_TEXT}},
        {"line": 3, "contract_id": good[1]["contract_id"], "status": "queued"},
        {"line": 5, "contract_id": None, "error": {"code": "invalid_payload", "message": ANY_TEXT}},
        {
            "line": 6,
            "contract_id": conflicting["contract_id"],
            "error": {"code": "email_bound_to_other_company", "message": ANY_TEXT},
        },
        {
            "line": 7,
            "contract_id": bad_email["contract_id"],
            "error": {"code": "invalid_email", "message": ANY_TEXT},
        },
        {"line": 8, "contract_id": good[2]["contract_id"], "status": "queued"},
    ], describe(result)
    # Each refusal on stderr with its line, then the summary.
    for line, code in ((2, "invalid_payload"), (5, "invalid_payload"), (6, "email_bound_to_other_company")):
        assert f"line {line}: " in result.stderr and f": {code}: " in result.stderr, describe(result)
    assert "7 contracts: 3 queued, 4 refused" in result.stderr, describe(result)
    assert "Lefebvre" not in result.stderr + result.stdout

    for payload in good:
        wait_for_invitation(payload["contract_id"])
        assert len(standin.accepted_for(f"invitation:{payload['contract_id']}:")) == 1
    assert_not_queued(conflicting["contract_id"])
    assert_not_queued(bad_email["contract_id"])


def test_send_contracts_refuses_json_python_cannot_read_line_by_line(cli):
    good = [contract_payload() for _ in range(2)]
    too_deep = "[" * 100_000 + "]" * 100_000
    too_long = '{"contract_id": ' + "1" * 5_000 + "}"
    result = cli("send-contracts", "--json", stdin=json_lines(good[0], too_deep, too_long, good[1]))

    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert answers(result) == [
        {"line": 1, "contract_id": good[0]["contract_id"], "status": "queued"},
        {
            "line": 2,
            "contract_id": None,
            "error": {"code": "invalid_payload", "message": "JSON nested too deeply"},
        },
        {
            "line": 3,
            "contract_id": None,
            "error": {"code": "invalid_payload", "message": "JSON with a number too long to read"},
        },
        {"line": 4, "contract_id": good[1]["contract_id"], "status": "queued"},
    ], describe(result)


def test_send_contracts_whose_reader_goes_away_stops_with_one_line(cli, tmp_path):
    path = tmp_path / "many.jsonl"
    payloads = [contract_payload() for _ in range(600)]
    path.write_text(json_lines(*payloads))
    process = subprocess.Popen(
        [CLI, "send-contracts", str(path), "--json", "--batch-size", "50"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    first = json.loads(process.stdout.readline())
    assert first["line"] == 1 and first["status"] == "queued"
    process.stdout.close()  # as `| head -1` does
    stderr = process.stderr.read()
    assert process.wait(timeout=COMMAND_TIMEOUT_SECONDS) == 3, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    (closed,) = [line for line in stderr.splitlines() if line.startswith("stdout was closed: ")]
    assert "sending the same input again is safe" in closed
    # The summary counts every contract sent, answered on stdout or not.
    found = re.search(r"lines up to (\d+) were answered .*\((\d+) contracts: (\d+) queued", closed)
    assert found is not None, closed
    from contract_dispatch import contract_status

    through, counted, queued = (int(group) for group in found.groups())
    assert through % 50 == 0 and through >= 50 and counted == queued == through, closed
    assert contract_status(payloads[through - 1]["contract_id"]) is not None
    if through < len(payloads):
        assert contract_status(payloads[through]["contract_id"]) is None


def _with_stdout_closed(env: dict[str, str], *argv: str) -> tuple[int, str]:
    """``contract-dispatch ARGV`` whose reader went away at once (`| head -c 0`): exit code, stderr."""
    process = subprocess.Popen(
        [CLI, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read()
    return process.wait(timeout=COMMAND_TIMEOUT_SECONDS), stderr


def test_a_command_whose_reader_closed_stdout_says_so_in_one_line(cli, worker):
    """One answer whether the last write was buffered or not (PYTHONUNBUFFERED): exit 3, one line."""
    closed = "stdout was closed by its reader: the output was not all written (what the command did stands)\n"
    unbuffered = {**cli.env, "PYTHONUNBUFFERED": "1"}
    buffered = {key: value for key, value in cli.env.items() if key != "PYTHONUNBUFFERED"}
    payloads = [contract_payload(), contract_payload()]
    for env, payload in zip((unbuffered, buffered), payloads, strict=True):
        code, stderr = _with_stdout_closed(env, *send_args(payload))
        assert (code, stderr) == (3, closed)
        # What it did stands: the contract was sent.
        cli.wait_status(
            payload["contract_id"], lambda report: report["status"] == "sent", "the contract sent"
        )
    for env in (unbuffered, buffered):
        for argv in (
            ["contract-status", payloads[0]["contract_id"], "--json"],
            ["status", "--json"],
            ["status"],
        ):
            code, stderr = _with_stdout_closed(env, *argv)
            assert (code, stderr) == (3, closed), argv


def test_send_contracts_stopped_by_ctrl_c_says_up_to_which_line(cli, worker):
    payloads = [contract_payload() for _ in range(3)]
    process = subprocess.Popen(
        [CLI, "send-contracts", "--json", "--batch-size", "1"],
        env=cli.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    # The input stays open, as a producer still writing would keep it.
    process.stdin.write(json_lines(*payloads))
    process.stdin.flush()
    answered = [json.loads(process.stdout.readline()) for _ in payloads]
    assert [answer["status"] for answer in answered] == ["queued"] * 3
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=COMMAND_TIMEOUT_SECONDS) == 130
    stderr = process.stderr.read()
    assert "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1].startswith("interrupted: lines up to 3 were answered (sent or refused)"), (
        stderr
    )
    assert "sending the same input again is safe" in stderr
    process.stdin.close()


def _line_within(stream: Any, seconds: float) -> bytes:
    """The next line of a child's unbuffered output pipe, failing if none comes within ``seconds``.

    Unbuffered (``bufsize=0``): a buffered reader may hold the next line already,
    where ``select`` on the pipe cannot see it.
    """
    readable, _, _ = select.select([stream], [], [], seconds)
    assert readable, f"no line within {seconds} s"
    line: bytes = stream.readline()
    return line


@contextmanager
def _send_contracts_pipe(env: dict[str, str], *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """``send-contracts --json OPTIONS`` reading a pipe the test writes to, its answers
    unbuffered (see ``_line_within``); killed on the way out if it still runs."""
    process = subprocess.Popen(
        [CLI, "send-contracts", "--json", *options],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_send_contracts_answers_each_line_written_to_a_pipe_as_it_comes(cli):
    """A producer writing one line at a time, its pipe still open, has each sent before the next.

    With the default batch size (500): a batch takes the lines already arrived,
    it does not wait until it is full or the input has ended.
    """
    payloads = [contract_payload() for _ in range(2)]
    with _send_contracts_pipe(cli.env) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        for number, payload in enumerate(payloads, start=1):
            process.stdin.write(json_lines(payload).encode())
            answer = json.loads(_line_within(process.stdout, COMMAND_TIMEOUT_SECONDS))
            assert answer == {"line": number, "contract_id": payload["contract_id"], "status": "queued"}
        process.stdin.close()
        assert process.wait(timeout=COMMAND_TIMEOUT_SECONDS) == 0
        stderr = process.stderr.read().decode()
    assert stderr.splitlines()[-1].startswith("2 contracts: 2 queued, 0 refused"), stderr
    for payload in payloads:
        report = cli.status(payload["contract_id"])
        assert report is not None and report["status"] == "queued", report


def test_contract_status_answers_each_id_written_to_a_pipe_as_it_comes(cli, worker, standin):
    """A script following its contracts writes ids one at a time: each is answered before the next."""
    payloads = [contract_payload() for _ in range(2)]
    for payload in payloads:
        assert_receipt(cli(*send_args(payload)), payload["contract_id"])
        wait_for_invitation(payload["contract_id"])
    process = subprocess.Popen(
        [CLI, "contract-status", "-", "--json"],
        env=cli.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    try:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        for payload in payloads:
            process.stdin.write(f"{payload['contract_id']}\n".encode())
            answer = json.loads(_line_within(process.stdout, COMMAND_TIMEOUT_SECONDS))
            assert (answer["contract_id"], answer["status"]) == (payload["contract_id"], "sent")
        # A line no id can be (longer than 1024 bytes): answered, in its place, as unknown.
        process.stdin.write(b"x" * 2000 + b"\n")
        answer = json.loads(_line_within(process.stdout, COMMAND_TIMEOUT_SECONDS))
        assert answer["contract_id"] is None
        assert answer["error"] == {
            "code": "unknown_contract",
            "message": "a line longer than 1024 bytes is not a contract id",
        }
        process.stdin.close()
        assert process.wait(timeout=COMMAND_TIMEOUT_SECONDS) == 1
        assert process.stderr.read().decode() == (
            "unknown_contract: a line longer than 1024 bytes is not a contract id\n"
        )
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_send_contracts_linger_ms_gathers_the_lines_that_come_within_it(cli):
    payloads = [contract_payload() for _ in range(3)]
    with _send_contracts_pipe(cli.env, "--batch-size", "2", "--linger-ms", "60000") as process:
        assert process.stdin is not None and process.stdout is not None
        # A full batch does not wait: both answered (and the command is up).
        process.stdin.write(json_lines(*payloads[:2]).encode())
        for number in (1, 2):
            assert json.loads(_line_within(process.stdout, COMMAND_TIMEOUT_SECONDS))["line"] == number
        # The next line waits for company, up to a minute: not sent, not answered.
        process.stdin.write(json_lines(payloads[2]).encode())
        readable, _, _ = select.select([process.stdout], [], [], 1.0)
        assert not readable, process.stdout.readline()
        assert cli.status(payloads[2]["contract_id"]) is None
        # The end of the input ends the wait.
        process.stdin.close()
        assert process.wait(timeout=COMMAND_TIMEOUT_SECONDS) == 0
        last = json.loads(process.stdout.read())
    assert last == {"line": 3, "contract_id": payloads[2]["contract_id"], "status": "queued"}


def test_settings_found_unusable_late_exit_3_in_one_line(cli, tmp_path):
    # No SECRET_KEY, and a DATA_DIR that cannot be created to hold a generated one.
    (tmp_path / "a-file").write_text("")
    env = {key: value for key, value in cli.env.items() if key != "SECRET_KEY"}
    env["DATA_DIR"] = str(tmp_path / "a-file" / "data")
    result = run_cli(env, "verify-code", "--email", "client@example.com", "--code", "ABCD-EFGH")
    assert result.returncode == 3, describe(result)
    assert result.stderr.startswith("unavailable: no SECRET_KEY, and DATA_DIR cannot hold"), describe(result)
    assert "Traceback" not in result.stderr

    # A Redis database index the server does not have: Redis answers, and refuses.
    assert cli.env["REDIS_URL"].endswith("/0")
    env = {**cli.env, "REDIS_URL": cli.env["REDIS_URL"][: -len("/0")] + "/99"}
    payload = contract_payload()
    result = run_cli(env, *send_args(payload))
    assert result.returncode == 3, describe(result)
    assert "broker refused the command (DB index is out of range)" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr
    assert cli.status(payload["contract_id"]) is None, "nothing reserved for a message never sent"


def test_send_contracts_from_a_file_again_sends_nothing_twice(cli, worker, standin, tmp_path):
    payloads = [contract_payload() for _ in range(5)]
    path = tmp_path / "contracts.jsonl"
    path.write_text(json_lines(*payloads), encoding="utf-8")

    first = cli("send-contracts", str(path), "--batch-size", "2")
    assert first.returncode == 0, describe(first)
    assert first.stdout == "", describe(first)
    assert "5 contracts: 5 queued, 0 refused" in first.stderr, describe(first)
    for payload in payloads:
        wait_for_invitation(payload["contract_id"])

    again = cli("send-contracts", str(path), "--json")
    assert again.returncode == 0, describe(again)
    assert [answer["status"] for answer in answers(again)] == ["sent"] * 5, describe(again)
    assert "5 contracts: 5 sent, 0 refused" in again.stderr, describe(again)
    for payload in payloads:
        assert len(standin.accepted_for(f"invitation:{payload['contract_id']}:")) == 1


def test_send_contracts_refuses_a_line_that_is_not_utf8_alone(cli, worker):
    payload = contract_payload()
    stdin_bytes = b"\xff\xfe{}\n" + json_lines(payload).encode()
    result = subprocess.run(
        [CLI, "send-contracts", "--json"],
        env=cli.env,
        input=stdin_bytes,
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.returncode == 2, result
    assert output[0]["line"] == 1 and output[0]["error"]["code"] == "invalid_payload", output
    assert "UTF-8" in output[0]["error"]["message"], output
    assert output[1] == {"line": 2, "contract_id": payload["contract_id"], "status": "queued"}, output
    wait_for_invitation(payload["contract_id"])


def test_send_contracts_refuses_a_line_too_long_to_be_a_payload_alone(cli, tmp_path):
    """A file with no newline for megabytes (binary, say) is refused line by line, never held whole."""
    payload = contract_payload()
    path = tmp_path / "mixed.jsonl"
    too_long = workers.cli_bulk.MAX_LINE_BYTES + 1
    path.write_bytes(b'{"contract_id": "' + b"x" * too_long + b'"}\n' + json_lines(payload).encode())
    result = cli("send-contracts", str(path), "--json")
    assert result.returncode == 2, describe(result)
    first, second = answers(result)
    assert first == {
        "line": 1,
        "contract_id": None,
        "error": {
            "code": "invalid_payload",
            "message": f"line longer than {workers.cli_bulk.MAX_LINE_BYTES} bytes",
        },
    }, first
    assert second == {"line": 2, "contract_id": payload["contract_id"], "status": "queued"}


def test_send_contracts_reads_a_file_saved_with_a_byte_order_mark(cli, tmp_path):
    # Notepad and spreadsheet exports write "UTF-8 with BOM": the mark is not JSON,
    # but it only says the file is UTF-8; a mark on a later line is still refused.
    first, second = contract_payload(), contract_payload()
    path = tmp_path / "contracts.jsonl"
    bom = b"\xef\xbb\xbf"
    path.write_bytes(bom + json_lines(first).encode() + bom + json_lines(second).encode())

    result = cli("send-contracts", str(path), "--json")

    output = answers(result)
    assert output[0] == {"line": 1, "contract_id": first["contract_id"], "status": "queued"}, describe(result)
    assert output[1]["line"] == 2 and output[1]["error"]["code"] == "invalid_payload", describe(result)
    assert result.returncode == 2, describe(result)


def test_send_contracts_to_an_unreachable_broker_says_what_was_not_sent(cli):
    unreachable = Cli({**cli.env, "REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"})
    payloads = [contract_payload() for _ in range(3)]
    result = unreachable("send-contracts", "--json", stdin=json_lines(*payloads))
    assert result.returncode == 3, describe(result)
    assert result.stdout == "", describe(result)
    assert result.stderr.startswith("unavailable: the message broker cannot be reached"), describe(result)
    assert "line 1 and those after it were not sent" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr
    for payload in payloads:
        status = cli("contract-status", payload["contract_id"])
        assert status.returncode == 1, describe(status)


def test_send_commands_with_an_unreachable_database_exit_3_without_a_traceback(cli):
    port = closed_port()
    url = f"postgresql://postgres:do-not-print@127.0.0.1:{port}/test"
    unreachable = Cli({**cli.env, "DATABASE_URL": url})
    payload = contract_payload()
    for result in (
        unreachable(*send_args(payload)),
        unreachable("send-contracts", stdin=json_lines(payload)),
    ):
        assert result.returncode == 3, describe(result)
        assert result.stderr.startswith("unavailable: the database cannot be reached"), describe(result)
        assert "Traceback" not in result.stderr
        assert "do-not-print" not in result.stderr + result.stdout


def test_commands_give_up_on_a_database_that_never_answers(cli):
    """libpq waits forever for a server that accepts and never answers (hung, or a
    half-open proxy): a command gives up after DATABASE_CONNECT_TIMEOUT_SECONDS."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"postgresql://postgres:do-not-print@127.0.0.1:{listener.getsockname()[1]}/test"
        hung = Cli({**cli.env, "DATABASE_URL": url})
        for result in (hung("contract-status", "c-anything", "--json"), hung(*send_args(contract_payload()))):
            assert result.returncode == 3, describe(result)
            assert result.stderr == (
                "unavailable: the database cannot be reached (ConnectionTimeout); nothing more was done\n"
            ), describe(result)
            assert result.stdout == ""


def test_send_contracts_refuses_an_unreadable_file_and_a_bad_batch_size(cli_without_database, tmp_path):
    missing = cli_without_database("send-contracts", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2, describe(missing)
    assert "cannot read" in missing.stderr and "missing.jsonl" in missing.stderr, describe(missing)
    for size in ("0", "5001", "many"):
        result = cli_without_database("send-contracts", "--batch-size", size, stdin="")
        assert result.returncode == 2, describe(result)
        assert "--batch-size" in result.stderr, describe(result)


def _as_a_terminal_shows(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: CR returns, ESC[K erases to the line's end."""
    lines: list[str] = []
    current: list[str] = []
    column = 0
    index = 0
    while index < len(text):
        if text.startswith("\x1b[K", index):
            del current[column:]
            index += 3
            continue
        char = text[index]
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("".join(current))
            current, column = [], 0
        else:
            current[column : column + 1] = [char]
            column += 1
        index += 1
    lines.append("".join(current))
    return lines


def test_send_contracts_progress_rewrites_one_line_on_a_terminal():
    import io

    from workers.cli_bulk import Tally
    from workers.cli_progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress, tally = Progress(terminal), Tally()
    for number in range(1, 4):
        tally.add(number, "queued")
        progress.update(tally.describe())
        if number == 2:
            # A refusal: on a line of its own, never after the progress text.
            progress.write("line 2: c-2: invalid_email: not an address")
    progress.finish()
    terminal.write("3 contracts: 3 queued, 0 refused\n")  # the command's summary, once
    shown = terminal.getvalue()
    assert shown.count("3 contracts: 3 queued, 0 refused (") == 1, repr(shown)
    assert _as_a_terminal_shows(shown) == [
        "line 2: c-2: invalid_email: not an address",
        "3 contracts: 3 queued, 0 refused",
        "",
    ], repr(shown)


def test_send_contracts_summary_counts_one_contract_in_the_singular():
    from workers.cli_bulk import Tally

    tally = Tally()
    tally.add(1, "refused")
    assert tally.describe().startswith("1 contract: 0 queued, 1 refused (")
    tally.add(2, "queued")
    assert tally.describe().startswith("2 contracts: 1 queued, 1 refused (")


def test_every_argument_of_every_command_says_what_it_is_for():
    import argparse

    from workers.cli import build_parser

    silent: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, command in action.choices.items():
                    walk(command, [*path, name])
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                silent.append(" ".join([*path, *(action.option_strings or [action.dest])]))

    walk(build_parser(), [])
    assert silent == [], f"--help says nothing of: {', '.join(silent)}"


# -- schema --------------------------------------------------------------------------


def test_schema_exports_the_public_messages(cli_without_database):
    result = cli_without_database("schema")
    assert result.returncode == 0, describe(result)
    schemas = json.loads(result.stdout)
    assert {"send_contract", "notify_signatories"} <= set(schemas)
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)

    send = Draft202012Validator(schemas["send_contract"])
    valid = contract_payload(resource_group_id="rg-1", locale="en")
    assert list(send.iter_errors(valid)) == []
    invalid = [
        contract_payload(lead_source="salon"),
        {k: v for k, v in contract_payload().items() if k != "email"},
        contract_payload(sections=[]),
        contract_payload(signatories=[]),
        contract_payload(unexpected="field"),
        contract_payload(locale="de"),
    ]
    for payload in invalid:
        assert not send.is_valid(payload), payload

    notify = Draft202012Validator(schemas["notify_signatories"])
    signed = {"contract_id": "c-1", "legal_name": "Dupont SARL", "accepted_sections": ["conditions"]}
    assert list(notify.iter_errors(signed)) == []
    assert not notify.is_valid({**signed, "accepted_sections": []})
    assert not notify.is_valid({k: v for k, v in signed.items() if k != "legal_name"})


# -- the whole journey -----------------------------------------------------------------


def test_full_journey_through_the_cli_only(cli, worker, standin):
    workspace = unique("ws")
    contract_id = unique("c")
    email = f"{unique('client')}@example.com"
    result = cli("workspace", "set", workspace, "--resource-group", "bordeaux", "--resource-group", "lille")
    assert result.returncode == 0, describe(result)

    sent = cli(
        "send-contract",
        "--contract-id",
        contract_id,
        "--email",
        email,
        "--company",
        "Boulangerie Lefèvre & Fils",
        "--lead-source",
        "network",
        "--workspace",
        workspace,
        "--resource-group",
        "lille",
        "--signatory",
        "gerante@example.com:Sophie Gérante",
        "--signatory",
        "compta@example.com",
        "--section",
        "conditions:Conditions générales",
        "--section",
        "tarifs:Tarifs",
        "--title",
        "Bureau fermé",
    )
    assert_receipt(sent, contract_id)
    invited = cli.wait_status(contract_id, emails_sent("invitation", 1), "the invitation")
    assert invited["status"] == "sent"
    (invitation,) = standin.accepted_for(f"invitation:{contract_id}:")
    assert invitation.to == [email]

    notified = cli(
        "notify-signatories",
        "--contract-id",
        contract_id,
        "--legal-name",
        "Boulangerie Lefèvre & Fils",
        "--accepted-section",
        "tarifs",
        "--accepted-section",
        "conditions",
        "--registration-number",
        "552 100 554",
        "--signer-name",
        "Paul Lefèvre",
    )
    assert_receipt(notified, contract_id)
    final = cli.wait_status(
        contract_id,
        lambda r: r["status"] == "signed" and emails_sent("signed_notification", 2)(r),
        "both signatories to be told",
    )
    assert final["error"] is None
    assert sorted(e["to"] for e in final["emails"] if e["kind"] == "signed_notification") == [
        "compta@example.com",
        "gerante@example.com",
    ]
    received = {r.to[0]: r for r in standin.accepted_for(f"signed_notification:{contract_id}:")}
    assert sorted(received) == ["compta@example.com", "gerante@example.com"]
    text = received["gerante@example.com"].content("text/plain")
    assert "Sophie Gérante" in text
    assert "Boulangerie Lefèvre & Fils" in text
    assert "552 100 554" in text
    assert "Paul Lefèvre" in text


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+00:00"])
def test_reminders_run_at_the_ends_of_the_calendar_is_a_usage_error(moment, capsys):
    """A sweep adds days (delays, windows, code lifetimes): it would overflow there, with a traceback."""
    from workers.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["reminders", "run", "--now", moment])
    assert exited.value.code == 2
    assert "is out of range (years 3 to 9997)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["send-contracts", "contracts.jsonl", "--bogus"], "usage: contract-dispatch send-contracts "),
        (["dead-letters", "list", "--bogus", "x"], "usage: contract-dispatch dead-letters list "),
        (
            ["workspace", "set", "w1", "--resource-group", "g", "extra"],
            "usage: contract-dispatch workspace set ",
        ),
    ],
)
def test_an_unknown_option_is_refused_with_its_commands_usage(argv, usage, capsys):
    """The usage shown is the command's own, so it lists the options that command takes."""
    from workers.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    unknown = " ".join(argv[argv.index("--bogus") if "--bogus" in argv else -1 :])
    assert f"error: unrecognized arguments: {unknown}" in err
