"""Rule 2: the lead source is reportable (the marketplace bills on it).

The report's arithmetic runs on databases of their own holding exactly the
contracts each test writes (times chosen at the period's edges); the command's
run goes through the real pipeline on the shared database, in a workspace of
its own, with the in-process worker sending to the stand-in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import models.reporting
from contract_dispatch import (
    cancel_contract,
    lead_source_report,
    notify_signatories,
    reported_contracts,
    send_contract,
    set_workspace,
)
from models.contract import Contract
from models.errors import InvalidLeadSource, UnknownWorkspace
from tests.conftest import database_of_its_own
from tests.processes import describe, run_cli
from tests.support import all_emails_sent, contract_payload, unique, wait_for_contract
from workers.database import session_scope

#: The period the arithmetic tests report on: November 2026, half-open.
SINCE = datetime(2026, 11, 1, tzinfo=UTC)
UNTIL = datetime(2026, 12, 1, tzinfo=UTC)

#: How long the command's test waits for the worker to move a contract on, in seconds.
STATUS_TIMEOUT_SECONDS = 30


@pytest.fixture
def own_database(database: str, tmp_path: Path) -> Iterator[str]:
    """A database of the kind under test holding only what the test writes (and ws-main)."""
    with database_of_its_own(database, tmp_path / "reports.db") as url:
        set_workspace("ws-other", ["rg-2"])
        yield url


def record(
    contract_id: str,
    *,
    lead_source: str,
    status: str,
    created_at: datetime,
    signed_at: datetime | None = None,
    workspace_id: str = "ws-main",
) -> None:
    """A contract row as the pipeline leaves it (the report only reads these columns)."""
    with session_scope() as session:
        session.add(
            Contract(
                id=contract_id,
                status=status,
                workspace_id=workspace_id,
                resource_group_id="rg-1",
                email=f"{contract_id.lower()}@example.com",
                company_name=f"Société {contract_id}",
                lead_source=lead_source,
                created_at=created_at,
                updated_at=created_at,
                signed_at=signed_at,
            )
        )


def counts_of(report: Any) -> dict[str | None, tuple[int, dict[str, int], int]]:
    """Each lead source's (contracts, non-zero statuses, signed in period)."""
    return {
        counts.lead_source: (
            counts.contracts,
            {status: n for status, n in counts.statuses.items() if n},
            counts.signed_in_period,
        )
        for counts in report.lead_sources
    }


def test_report_counts_contracts_sent_in_a_half_open_period_by_status_now(own_database):
    just_before = SINCE - timedelta(microseconds=1)
    record("A-before", lead_source="bap", status="signed", created_at=just_before, signed_at=SINCE)
    record("A-first", lead_source="bap", status="sent", created_at=SINCE)
    record(
        "A-signed",
        lead_source="bap",
        status="signed",
        created_at=SINCE + timedelta(days=3),
        signed_at=SINCE + timedelta(days=4),
    )
    record(
        "A-late-sign",
        lead_source="bap",
        status="signed",
        created_at=UNTIL - timedelta(hours=1),
        signed_at=UNTIL,
    )
    record("A-last", lead_source="bap", status="queued", created_at=UNTIL - timedelta(microseconds=1))
    record("A-after", lead_source="bap", status="queued", created_at=UNTIL)
    record("N-1", lead_source="network", status="rejected", created_at=SINCE + timedelta(days=1))
    record("N-2", lead_source="network", status="cancelled", created_at=SINCE + timedelta(days=2))
    record("X-1", lead_source="", status="rejected", created_at=SINCE + timedelta(days=5))
    record(
        "O-1",
        lead_source="bap",
        status="signed",
        created_at=SINCE + timedelta(days=6),
        signed_at=SINCE + timedelta(days=7),
        workspace_id="ws-other",
    )

    report = lead_source_report(since=SINCE, until=UNTIL)
    assert counts_of(report) == {
        # A-before: sent before the period, signed at its first instant.
        "bap": (5, {"sent": 1, "signed": 3, "queued": 1}, 3),
        "network": (2, {"rejected": 1, "cancelled": 1}, 0),
        "other": (0, {}, 0),
        # A contract refused before its lead source was read is still counted.
        None: (1, {"rejected": 1}, 0),
    }
    assert [counts.lead_source for counts in report.lead_sources] == ["bap", "network", "other", None]
    assert report.total.contracts == 8
    assert report.total.signed_in_period == 3
    assert report.total.statuses == {"queued": 1, "sent": 1, "rejected": 2, "signed": 3, "cancelled": 1}

    mine = lead_source_report(since=SINCE, until=UNTIL, workspace_id="ws-main", lead_source="bap")
    assert counts_of(mine) == {"bap": (4, {"sent": 1, "signed": 2, "queued": 1}, 2)}
    # Consecutive periods share no contract: October then November then December.
    october = lead_source_report(since=SINCE - timedelta(days=31), until=SINCE, lead_source="bap")
    december = lead_source_report(since=UNTIL, until=UNTIL + timedelta(days=31), lead_source="bap")
    assert counts_of(october)["bap"] == (1, {"signed": 1}, 0)
    assert counts_of(december)["bap"] == (1, {"queued": 1}, 1)
    everything = lead_source_report()
    assert everything.total.contracts == 10
    assert everything.total.signed_in_period == 4


def test_listing_streams_the_contracts_of_the_period_oldest_first(own_database, monkeypatch):
    # Fetched two rows at a time: the listing reads on past its first batch.
    monkeypatch.setattr(models.reporting, "LISTING_BATCH_ROWS", 2)
    for day in (5, 1, 3, 2, 4):
        signed_at = SINCE + timedelta(days=10 - day) if day != 4 else None
        record(
            f"B-{day}",
            lead_source="bap",
            status="signed" if signed_at else "sent",
            created_at=SINCE + timedelta(days=day),
            signed_at=signed_at,
        )
    record("N-1", lead_source="network", status="sent", created_at=SINCE + timedelta(days=1, hours=1))
    record(
        "B-old",
        lead_source="bap",
        status="signed",
        created_at=SINCE - timedelta(days=1),
        signed_at=SINCE + timedelta(days=20),
    )

    sent = list(reported_contracts(measure="sent", since=SINCE, until=UNTIL, lead_source="bap"))
    assert [c.contract_id for c in sent] == ["B-1", "B-2", "B-3", "B-4", "B-5"]
    first = sent[0]
    assert (first.workspace_id, first.resource_group_id, first.status, first.company_name) == (
        "ws-main",
        "rg-1",
        "signed",
        "Société B-1",
    )
    assert first.sent_at == SINCE + timedelta(days=1)
    assert first.signed_at == SINCE + timedelta(days=9)

    signed = list(reported_contracts(measure="signed", since=SINCE, until=UNTIL))
    # By signature time, whenever sent (B-old was sent in October).
    assert [c.contract_id for c in signed] == ["B-5", "B-3", "B-2", "B-1", "B-old"]
    assert list(reported_contracts(measure="sent", since=UNTIL)) == []


def test_an_unknown_workspace_or_lead_source_is_refused_not_reported_as_zero(own_database):
    with pytest.raises(UnknownWorkspace, match="'ws-typo' is not registered"):
        lead_source_report(workspace_id="ws-typo")
    with pytest.raises(UnknownWorkspace):
        next(reported_contracts(workspace_id="ws-typo"))
    with pytest.raises(
        InvalidLeadSource, match="'marketplace' is not a lead source \\(bap, network, other\\)"
    ):
        lead_source_report(lead_source="marketplace")
    with pytest.raises(InvalidLeadSource):
        next(reported_contracts(lead_source="bap\x00"))
    # No workspace can have these; PostgreSQL would refuse the NUL as a query parameter.
    for impossible in ("ws\x00main", "ws main", "w" * 200):
        with pytest.raises(UnknownWorkspace):
            lead_source_report(workspace_id=impossible)


def test_a_naive_time_or_an_empty_period_is_refused(own_database):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="timezone"):
        lead_source_report(since=datetime(2026, 11, 1))
    with pytest.raises(ValidationError, match="since must be before until"):
        lead_source_report(since=UNTIL, until=SINCE)
    with pytest.raises(ValidationError, match="since must be before until"):
        next(reported_contracts(since=SINCE, until=SINCE))


# -- the command ----------------------------------------------------------------


def lead_sources(env: dict[str, str], *args: str) -> Any:
    result = run_cli(env, "lead-sources", *args)
    assert result.returncode == 0, describe(result)
    return result


def test_lead_sources_command_reports_contracts_through_their_journey(
    test_environment, database, worker, standin
):
    workspace = unique("ws")
    set_workspace(workspace, ["rg-1"])
    env = {**os.environ, **test_environment, "DATABASE_URL": database}
    payloads = {
        name: contract_payload(workspace_id=workspace, lead_source=source)
        for name, source in [("bap-1", "bap"), ("bap-2", "bap"), ("net", "network"), ("other", "other")]
    }
    started = datetime.now(UTC)
    for name in ("bap-1", "bap-2", "net"):
        send_contract(**payloads[name])
    for name in ("bap-1", "bap-2", "net"):
        wait_for_contract(payloads[name]["contract_id"], all_emails_sent(1), timeout=STATUS_TIMEOUT_SECONDS)
    signed = payloads["bap-1"]
    notify_signatories(
        contract_id=signed["contract_id"],
        legal_name=signed["company_name"],
        accepted_sections=["conditions", "tarifs"],
    )
    wait_for_contract(signed["contract_id"], lambda r: r.status == "signed", timeout=STATUS_TIMEOUT_SECONDS)
    # Queued with no worker taking it yet is not guaranteed: cancelled either way.
    send_contract(**payloads["other"])
    cancel_contract(contract_id=payloads["other"]["contract_id"])
    wait_for_contract(
        payloads["other"]["contract_id"], lambda r: r.status == "cancelled", timeout=STATUS_TIMEOUT_SECONDS
    )

    summary = json.loads(lead_sources(env, "--workspace", workspace, "--json").stdout)
    zero = {"queued": 0, "sent": 0, "rejected": 0, "signed": 0, "cancelled": 0}
    assert summary == {
        "since": None,
        "until": None,
        "workspace_id": workspace,
        "lead_sources": [
            {
                "lead_source": "bap",
                "contracts": 2,
                "statuses": {**zero, "sent": 1, "signed": 1},
                "signed_in_period": 1,
            },
            {
                "lead_source": "network",
                "contracts": 1,
                "statuses": {**zero, "sent": 1},
                "signed_in_period": 0,
            },
            {
                "lead_source": "other",
                "contracts": 1,
                "statuses": {**zero, "cancelled": 1},
                "signed_in_period": 0,
            },
        ],
        "total": {
            "lead_source": None,
            "contracts": 4,
            "statuses": {**zero, "sent": 2, "signed": 1, "cancelled": 1},
            "signed_in_period": 1,
        },
    }

    table = lead_sources(env, "--workspace", workspace, "--since", started.isoformat()).stdout.splitlines()
    assert table[0] == f"Contracts by lead source from {started.isoformat()} to now, workspace {workspace}."
    rows = {line.split()[0]: line.split()[1:] for line in table[3:]}
    assert rows["lead"] == [
        "source",
        "contracts",
        "queued",
        "sent",
        "rejected",
        "signed",
        "cancelled",
        "signed",
        "in",
        "period",
    ]
    assert rows["bap"] == ["2", "0", "1", "0", "1", "0", "1"]
    assert rows["total"] == ["4", "0", "2", "0", "1", "1", "1"]

    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    later = json.loads(lead_sources(env, "--workspace", workspace, "--since", tomorrow, "--json").stdout)
    assert later["since"] == f"{tomorrow}T00:00:00+00:00"
    assert later["total"]["contracts"] == 0

    listing = lead_sources(env, "--workspace", workspace, "--contracts", "sent")
    # Redirected output: how many on stderr, the lines alone on stdout.
    assert listing.stderr == "4 contracts sent in the period\n"
    listed = listing.stdout.splitlines()
    assert listed[0].split("\t") == [
        "contract_id",
        "workspace_id",
        "resource_group_id",
        "lead_source",
        "status",
        "sent_at",
        "signed_at",
        "company_name",
    ]
    assert [line.split("\t")[0] for line in listed[1:]] == [
        payloads[name]["contract_id"] for name in ("bap-1", "bap-2", "net", "other")
    ]
    signed_listing = lead_sources(env, "--workspace", workspace, "--contracts", "signed", "--json")
    assert signed_listing.stderr == "1 contract signed in the period\n"
    lines = signed_listing.stdout.splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert (line["contract_id"], line["lead_source"], line["status"], line["company_name"]) == (
        signed["contract_id"],
        "bap",
        "signed",
        signed["company_name"],
    )
    assert datetime.fromisoformat(line["signed_at"]) >= datetime.fromisoformat(line["sent_at"]) >= started


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--since", "2026-12-01", "--until", "2026-11-01"], "--since must be before --until"),
        (["--since", "2026-12-01", "--until", "2026-12-01"], "--since must be before --until"),
        (["--until", "2026-12-01T00:00"], "has no time zone"),
        (["--since", "1 December"], "is not an ISO 8601 date"),
        (["--since", "0001-01-01T00:00:00+01:00"], "is out of range"),
        (["--contracts", "cancelled"], "invalid choice"),
    ],
)
def test_lead_sources_refuses_a_bad_period_with_its_usage(test_environment, database, args, said):
    result = run_cli({**os.environ, **test_environment, "DATABASE_URL": database}, "lead-sources", *args)
    assert result.returncode == 2, describe(result)
    assert result.stdout == ""
    assert said in result.stderr and "usage: contract-dispatch lead-sources" in result.stderr, describe(
        result
    )


@pytest.mark.parametrize("listing", [[], ["--contracts", "sent"], ["--contracts", "signed", "--json"]])
def test_lead_sources_refuses_an_unknown_workspace_before_any_output(test_environment, database, listing):
    env = {**os.environ, **test_environment, "DATABASE_URL": database}
    result = run_cli(env, "lead-sources", "--workspace", "ws-never-set", *listing)
    assert result.returncode == 2, describe(result)
    assert result.stdout == ""
    assert result.stderr == "unknown_workspace: workspace 'ws-never-set' is not registered\n"


def test_a_redirected_listing_shows_its_progress_on_stderr(own_database, monkeypatch):
    import io

    import workers.cli_reports
    from workers.cli import build_parser

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for day in range(1, 6):
        record(f"P-{day}", lead_source="bap", status="sent", created_at=SINCE + timedelta(days=day))
    monkeypatch.setattr(workers.cli_reports, "PROGRESS_EVERY_ROWS", 2)
    stdout, stderr = io.StringIO(), Terminal()
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stderr", stderr)
    args = build_parser().parse_args(["lead-sources", "--contracts", "sent", "--json"])
    assert workers.cli_reports.cmd_lead_sources(args) == 0
    assert [json.loads(line)["contract_id"] for line in stdout.getvalue().splitlines()] == [
        f"P-{day}" for day in range(1, 6)
    ]
    shown = stderr.getvalue()
    # Rewritten in place every 2 contracts, then erased before the count.
    assert "\r\x1b[K2 contracts listed\r\x1b[K4 contracts listed\r\x1b[K5 contracts sent" in shown, repr(
        shown
    )
    assert shown.endswith("5 contracts sent in the period\n"), repr(shown)
