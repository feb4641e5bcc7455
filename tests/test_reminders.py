"""Reminders, cancellation and manual resend (issue 4), with the clock injected.

Sweeps run "as of" a chosen moment (``run_reminders(as_of=...)``, ``reminders run
--now``); nothing waits for 09:00. An invitation is moved to a chosen moment by
rewriting what the clock recorded when it went out (``invited_at``), so the
expected reminder times are plain dates: a Monday 10:00 invitation is reminded on
Thursday 10:00, the next Monday and the Monday after.

A sweep acts on every due contract of its database, so each test that sweeps gets
a database of its own (an SQLite file or a PostgreSQL schema), switched in for the
in-process worker and for the subprocesses it starts: its sweeps see only its own
contracts, and the counts they report are exact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from argon2.exceptions import VerifyMismatchError
from sqlalchemy import inspect, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateTable
from sqlmodel import Session, col, select

import actors
import workers.reminders
from contract_dispatch import (
    Receipt,
    Rejected,
    cancel_contract,
    notify_signatories,
    resend_invitation,
    run_reminders,
    send_contract,
)
from models.access_codes import password_hasher
from models.account import Account
from models.contract import Contract
from models.delivery import Claim, EmailDelivery
from models.reminders import ReminderPolicy, ReminderSweep, start_cycle, sweep_due_reminders
from models.status import ContractReport
from models.types import utc_now
from models.upsert import table_of
from tests.conftest import _postgres_schema_url, database_of_its_own
from tests.processes import describe, run_cli
from tests.sendgrid_standin import Received, SendGridStandIn
from tests.support import (
    all_emails_sent,
    contract_payload,
    enqueue_raw,
    record_resend,
    unique,
    wait_for_contract,
    wait_until,
)
from tests.write_lock import run_with_argon2_held, take_write_lock
from workers.database import create_tables, get_engine, session_scope
from workers.settings import Settings, get_settings, parse_days

PARIS = ZoneInfo("Europe/Paris")
REPO = Path(__file__).resolve().parent.parent

#: The columns issue 4 added to ``contracts``.
REMINDER_COLUMNS = (
    "reminder_cycle_started_at",
    "reminder_count",
    "next_reminder_at",
    "cancelled_at",
    "cancel_reason",
)

#: A Monday, 10:00 in Paris: 3, 7 and 14 days later are all inside the window.
MONDAY = datetime(2027, 1, 4, 10, 0, tzinfo=PARIS)

_PASSWORD_LINE = re.compile(
    r"^\s*(?:Mot de passe temporaire :|Temporary password:)\s*(\S+)\s*$", re.MULTILINE
)


def paris(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=PARIS)


def default_policy(**overrides: Any) -> ReminderPolicy:
    """The documented defaults: 3, 7 and 14 days, Monday to Friday 09:00-18:00, Paris."""
    fields: dict[str, Any] = {
        "delays": (timedelta(days=3), timedelta(days=7), timedelta(days=14)),
        "days": parse_days("mon-fri"),
        "opens": time(9),
        "closes": time(18),
        "timezone": PARIS,
    }
    fields.update(overrides)
    return ReminderPolicy(**fields)


# -- the policy, alone ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "inside"),
    [
        (paris(2027, 1, 4, 9), True),  # Monday at the opening
        (paris(2027, 1, 4, 8, 59, 59), False),  # before the opening
        (paris(2027, 1, 6, 12), True),  # Wednesday noon
        (paris(2027, 1, 8, 17, 59, 59), True),  # Friday, the last second
        (paris(2027, 1, 8, 18), False),  # Friday at the closing
        (paris(2027, 1, 5, 20), False),  # Tuesday evening
        (paris(2027, 1, 9, 11), False),  # Saturday
        (paris(2027, 1, 10, 12), False),  # Sunday
        # The same instant written in UTC: the window is Paris time, not UTC.
        (datetime(2027, 1, 4, 8, 30, tzinfo=UTC), True),  # 09:30 in Paris
        (datetime(2027, 1, 4, 17, 30, tzinfo=UTC), False),  # 18:30 in Paris
    ],
)
def test_window_is_weekdays_from_opening_to_closing_paris_time(moment, inside):
    assert default_policy().in_window(moment) is inside


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (paris(2027, 1, 6, 12), paris(2027, 1, 6, 12)),  # inside: unchanged
        (paris(2027, 1, 5, 7), paris(2027, 1, 5, 9)),  # before opening: same day
        (paris(2027, 1, 5, 20), paris(2027, 1, 6, 9)),  # evening: next morning
        (paris(2027, 1, 8, 18), paris(2027, 1, 11, 9)),  # Friday closing: Monday
        (paris(2027, 1, 9, 11), paris(2027, 1, 11, 9)),  # Saturday: Monday
        (paris(2027, 1, 10, 23, 59), paris(2027, 1, 11, 9)),  # Sunday night: Monday
        (paris(2027, 1, 11, 0, 1), paris(2027, 1, 11, 9)),  # Monday night: Monday
    ],
)
def test_next_in_window_is_the_next_opening(moment, expected):
    found = default_policy().next_in_window(moment)
    assert found == expected
    assert default_policy().in_window(found)


def test_window_follows_paris_across_daylight_saving_changes():
    policy = default_policy()
    # 2026-03-29, last Sunday of March: Paris goes from +01:00 to +02:00.
    assert policy.next_in_window(paris(2026, 3, 28, 12)) == datetime(2026, 3, 30, 7, tzinfo=UTC)
    assert not policy.in_window(datetime(2026, 3, 30, 6, 59, tzinfo=UTC))  # 08:59 CEST
    assert policy.in_window(datetime(2026, 3, 30, 7, 0, tzinfo=UTC))  # 09:00 CEST
    assert policy.in_window(datetime(2026, 3, 27, 8, 0, tzinfo=UTC))  # 09:00 CET, the Friday before
    assert not policy.in_window(datetime(2026, 3, 30, 16, 0, tzinfo=UTC))  # 18:00 CEST
    # 2026-10-25, last Sunday of October: back to +01:00.
    assert policy.next_in_window(paris(2026, 10, 24, 12)) == datetime(2026, 10, 26, 8, tzinfo=UTC)
    assert not policy.in_window(datetime(2026, 10, 26, 7, 30, tzinfo=UTC))  # 08:30 CET
    assert policy.in_window(datetime(2026, 10, 23, 7, 30, tzinfo=UTC))  # 09:30 CEST, the Friday before

    # A weekend window on the very days the clocks change.
    weekend = default_policy(days=parse_days("sat-sun"))
    assert weekend.next_in_window(paris(2026, 3, 28, 18)) == datetime(2026, 3, 29, 7, tzinfo=UTC)
    assert not weekend.in_window(datetime(2026, 3, 29, 1, 30, tzinfo=UTC))  # 03:30 CEST, just after the jump
    assert weekend.next_in_window(paris(2026, 10, 24, 18)) == datetime(2026, 10, 25, 8, tzinfo=UTC)
    assert weekend.in_window(datetime(2026, 10, 25, 16, 59, tzinfo=UTC))  # 17:59 CET
    assert not weekend.in_window(datetime(2026, 10, 25, 17, 0, tzinfo=UTC))  # 18:00 CET

    # A reminder due across a change lands inside the window, in local time.
    friday = paris(2026, 3, 27, 10)
    due = policy.due_at(friday, 0, now=friday)
    assert due is not None
    assert policy.in_window(due)
    assert due.astimezone(PARIS).date() == paris(2026, 3, 30).date()


def test_window_days_parse_lists_and_ranges():
    assert parse_days("mon-fri") == {0, 1, 2, 3, 4}
    assert parse_days("sat-sun") == {5, 6}
    assert parse_days("mon,wed,fri") == {0, 2, 4}
    assert parse_days("Fri-Mon") == {4, 5, 6, 0}  # wraps over the weekend
    assert parse_days("tue") == {1}
    for bad in ("", "monday", "mon-xyz", "mon;fri"):
        with pytest.raises(ValueError, match="day"):
            parse_days(bad)


def test_custom_windows_from_settings():
    settings = Settings(
        reminder_window_days="mon,wed,fri",
        reminder_window_start="08:30",
        reminder_window_end="12:00",
        reminder_delays_days="2,5",
    )
    policy = settings.reminder_policy()
    assert policy.delays == (timedelta(days=2), timedelta(days=5))
    assert policy.in_window(paris(2027, 1, 6, 8, 30))  # Wednesday
    assert not policy.in_window(paris(2027, 1, 5, 10))  # Tuesday
    assert not policy.in_window(paris(2027, 1, 6, 12))  # Wednesday at the closing
    assert policy.next_in_window(paris(2027, 1, 5, 10)) == paris(2027, 1, 6, 8, 30)
    assert policy.next_in_window(paris(2027, 1, 6, 13)) == paris(2027, 1, 8, 8, 30)
    assert policy.next_in_window(paris(2027, 1, 8, 12)) == paris(2027, 1, 11, 8, 30)

    weekend = default_policy(days=parse_days("sat-sun"))
    assert weekend.next_in_window(paris(2027, 1, 8, 12)) == paris(2027, 1, 9, 9)  # Friday: Saturday
    assert weekend.next_in_window(paris(2027, 1, 10, 18)) == paris(
        2027, 1, 16, 9
    )  # Sunday night: next Saturday
    assert not weekend.in_window(paris(2027, 1, 11, 10))  # Monday

    with pytest.raises(ValueError):
        Settings(reminder_window_days="weekdays")
    with pytest.raises(ValueError):
        Settings(reminder_delays_days="7,3")


def test_due_at_follows_each_delay_then_stops():
    policy = default_policy()
    start = MONDAY
    assert policy.due_at(start, 0, now=start) == start + timedelta(days=3)
    assert policy.due_at(start, 1, now=start + timedelta(days=3)) == start + timedelta(days=7)
    assert policy.due_at(start, 2, now=start + timedelta(days=7)) == start + timedelta(days=14)
    # The cap: three delays, three reminders.
    assert policy.due_at(start, 3, now=start + timedelta(days=14)) is None
    assert policy.due_at(start, 7, now=start + timedelta(days=30)) is None
    # A delay that ends on a weekend waits for Monday's opening.
    wednesday = paris(2027, 1, 6, 10)
    assert policy.due_at(wednesday, 0, now=wednesday) == paris(2027, 1, 11, 9)
    # One delay configured: one reminder.
    single = default_policy(delays=(timedelta(days=2),))
    assert single.due_at(start, 0, now=start) == start + timedelta(days=2)
    assert single.due_at(start, 1, now=start + timedelta(days=2)) is None


def test_due_at_keeps_a_day_between_reminders_after_an_outage():
    policy = default_policy()
    start = MONDAY
    # No sweep for ten days: the first reminder goes out late, on Thursday A+10.
    late = start + timedelta(days=10)
    second = policy.due_at(start, 1, now=late)
    assert second == late + timedelta(days=1)  # not at once, although A+7 has passed
    third = policy.due_at(start, 2, now=second)
    assert third == start + timedelta(days=14)  # the schedule resumes

    # Late on a Friday: a day later is Saturday, so Monday's opening.
    friday = paris(2027, 1, 15, 17)
    assert policy.due_at(start, 1, now=friday) == paris(2027, 1, 18, 9)
    # Claimed at Monday's opening: the next one a day later, again at the opening.
    assert policy.due_at(start, 2, now=paris(2027, 1, 18, 9)) == paris(2027, 1, 19, 9)
    # The first reminder has no gap to keep: due 3 days after, even if that is long past.
    assert policy.due_at(start, 0, now=start + timedelta(days=20)) == start + timedelta(days=3)


# -- a database of each test's own ----------------------------------------------------


@pytest.fixture
def own_database(database: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database of the same kind as ``database``, made the process's database."""
    with database_of_its_own(database, tmp_path / "reminders.db") as url:
        yield url


@pytest.fixture
def cli_env(own_database: str, test_environment: dict[str, str]) -> dict[str, str]:
    """The environment of a subprocess working on this test's database."""
    return {**os.environ, **test_environment, "DATABASE_URL": own_database}


def assert_refused(result: subprocess.CompletedProcess[str], code: str) -> None:
    assert result.returncode == 2, describe(result)
    assert result.stdout == "", describe(result)
    assert any(line.startswith(f"{code}: ") for line in result.stderr.splitlines()), describe(result)


# -- helpers ---------------------------------------------------------------------------


def policy() -> ReminderPolicy:
    return get_settings().reminder_policy()


def send_and_wait(**overrides: Any) -> dict[str, Any]:
    """Send a contract through the producer API and wait for its invitation to be sent."""
    payload = contract_payload(**overrides)
    send_contract(**payload)
    wait_for_contract(
        payload["contract_id"], all_emails_sent(1), what=f"invitation of {payload['contract_id']}"
    )
    return payload


def invited_at(at: datetime, *contract_ids: str) -> None:
    """Record the invitations as sent at ``at``: the reminder cycle and the code start then."""
    settings = get_settings()
    with session_scope() as session:
        for contract_id in contract_ids:
            contract = session.get(Contract, contract_id, with_for_update=True)
            assert contract is not None and contract.status == "sent"
            contract.sent_at = at
            start_cycle(contract, now=at, policy=settings.reminder_policy())
            session.add(contract)
            account = session.get(Account, contract.account_id)
            assert account is not None
            if account.access_code_issued_at is not None:
                account.access_code_issued_at = at
                account.access_code_expires_at = at + timedelta(days=settings.access_code_ttl_days)
                session.add(account)


def stored(contract_id: str) -> Contract:
    with session_scope() as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        session.expunge(contract)
        return contract


def account_of(contract_id: str) -> Account:
    with session_scope() as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        account = session.get(Account, contract.account_id)
        assert account is not None
        session.expunge(account)
        return account


def deliveries(contract_id: str, kind: str | None = None) -> list[EmailDelivery]:
    with session_scope() as session:
        query = select(EmailDelivery).where(EmailDelivery.contract_id == contract_id)
        if kind is not None:
            query = query.where(EmailDelivery.kind == kind)
        rows = list(session.exec(query.order_by(col(EmailDelivery.step))).all())
        for row in rows:
            session.expunge(row)
        return rows


def delivery(delivery_id: int) -> EmailDelivery:
    with session_scope() as session:
        row = session.get(EmailDelivery, delivery_id)
        assert row is not None
        session.expunge(row)
        return row


def kind_sent(kind: str, count: int):
    """``done`` for ``wait_for_contract``: exactly ``count`` emails of ``kind``, all sent."""

    def check(report: ContractReport) -> bool:
        emails = [email for email in report.emails if email.kind == kind]
        return len(emails) == count and all(email.status == "sent" for email in emails)

    return check


def wait_reminders(contract_id: str, count: int) -> ContractReport:
    return wait_for_contract(
        contract_id, kind_sent("reminder", count), what=f"{count} reminder(s) of {contract_id} sent"
    )


def received(standin: SendGridStandIn, kind: str, contract_id: str) -> list[Received]:
    """What the stand-in accepted of one kind for one contract, by step."""
    found = standin.accepted_for(f"{kind}:{contract_id}:")
    return sorted(found, key=lambda request: int((request.reference or "").rsplit(":", 1)[1]))


def code_in(email: Received) -> str | None:
    """The temporary password an email carries, from its text part."""
    found = _PASSWORD_LINE.findall(email.content("text/plain"))
    assert len(found) <= 1, found
    return found[0] if found else None


def verifies(account: Account, code: str | None) -> bool:
    assert code is not None and account.access_code_hash is not None
    hasher = password_hasher(get_settings().access_code_policy().hash_parameters)
    try:
        return bool(hasher.verify(account.access_code_hash, code))
    except VerifyMismatchError:
        return False


def messages_done(client: redis.Redis, contract_id: str) -> bool:
    """The worker is through with every contracts message about one contract."""
    namespace = get_settings().redis_namespace
    for key in (f"{namespace}:contracts.msgs", f"{namespace}:contracts.DQ.msgs"):
        for raw in client.hvals(key):
            args = json.loads(raw).get("args") or [{}]
            if isinstance(args[0], dict) and args[0].get("contract_id") == contract_id:
                return False
    return True


# -- reminders on the clock -----------------------------------------------------------


SWEEP_REPORT_KEYS = {
    "as_of",
    "claimed",
    "postponed",
    "lost_races",
    "codes_renewed",
    "redriven",
    "batches",
    "duration_ms",
}


def test_three_reminders_at_the_configured_days_and_no_more(own_database, cli_env, worker, standin):
    fr = send_and_wait(locale="fr")
    en = send_and_wait(locale="en")
    contracts = [fr["contract_id"], en["contract_id"]]
    invited_at(MONDAY, *contracts)
    expected = [MONDAY + timedelta(days=days) for days in (3, 7, 14)]
    assert all(policy().in_window(moment) for moment in expected)
    assert stored(fr["contract_id"]).next_reminder_at == expected[0]

    # A sweep every six hours for four weeks, one of them through the CLI.
    through_cli = expected[1]
    claims: list[tuple[datetime, int]] = []
    sweeps = 0
    moment = MONDAY
    while moment <= MONDAY + timedelta(days=28):
        if moment in expected:
            early = run_reminders(as_of=moment - timedelta(seconds=1))
            sweeps += 1
            assert early.claimed == 0, f"a reminder claimed before it was due, at {moment}"
        if moment == through_cli:
            result = run_cli(cli_env, "reminders", "run", "--now", moment.isoformat())
            assert result.returncode == 0, describe(result)
            report = json.loads(result.stdout)
            assert set(report) == SWEEP_REPORT_KEYS, report
            assert datetime.fromisoformat(report["as_of"]) == moment
            assert (report["postponed"], report["lost_races"]) == (0, 0), report
            claimed = report["claimed"]
        else:
            claimed = run_reminders(as_of=moment).claimed
        sweeps += 1
        if claimed:
            claims.append((moment, claimed))
            again = run_reminders(as_of=moment)
            sweeps += 1
            assert (again.claimed, again.lost_races, again.postponed) == (0, 0, 0), again
            for contract_id in contracts:
                wait_reminders(contract_id, len(claims))
        moment += timedelta(hours=6)

    assert claims == [(moment, 2) for moment in expected]
    for payload, subject_start in ((fr, "Rappel : "), (en, "Reminder: ")):
        contract_id = payload["contract_id"]
        report = wait_reminders(contract_id, 3)
        assert report.status == "sent"
        assert report.reminder_count == 3
        assert report.next_reminder_at is None
        assert [email.step for email in report.emails if email.kind == "reminder"] == [1, 2, 3]
        emails = received(standin, "reminder", contract_id)
        assert [email.reference for email in emails] == [
            f"reminder:{contract_id}:{payload['email']}:{step}" for step in (1, 2, 3)
        ]
        link = f"https://app.example.com/contracts/{contract_id}"
        for email in emails:
            assert email.to == [payload["email"]]
            assert email.body["subject"].startswith(subject_start), email.body["subject"]
            assert link in email.content("text/plain")
            assert link in email.content("text/html")
        invitation = received(standin, "invitation", contract_id)[0]
        assert invitation.body["subject"] != emails[0].body["subject"]
    with session_scope() as session:
        recorded = session.exec(select(ReminderSweep)).all()
        assert len(recorded) == sweeps
        assert all(sweep.finished_at is not None and sweep.error is None for sweep in recorded)
        assert sum(sweep.claimed for sweep in recorded) == 6


def test_sweep_outside_the_window_waits_for_the_opening(own_database, worker, standin):
    weekend = send_and_wait()["contract_id"]
    evening = send_and_wait()["contract_id"]
    invited_at(paris(2027, 1, 5, 17), weekend)  # Tuesday 17:00: due Friday 17:00
    invited_at(paris(2027, 1, 9, 12), evening)  # Saturday noon: due Tuesday noon
    assert stored(weekend).next_reminder_at == paris(2027, 1, 8, 17)
    assert stored(evening).next_reminder_at == paris(2027, 1, 12, 12)

    assert run_reminders(as_of=paris(2027, 1, 8, 16, 59)).claimed == 0  # not due yet
    # No sweep ran on Friday evening; the first one is on Saturday morning.
    saturday = run_reminders(as_of=paris(2027, 1, 9, 11))
    assert (saturday.claimed, saturday.postponed) == (0, 1)
    assert stored(weekend).next_reminder_at == paris(2027, 1, 11, 9)
    assert stored(weekend).reminder_count == 0
    for moment in (paris(2027, 1, 10, 23), paris(2027, 1, 11, 8, 59, 59)):
        quiet = run_reminders(as_of=moment)
        assert (quiet.claimed, quiet.postponed) == (0, 0), moment
    assert deliveries(weekend, "reminder") == []

    opening = run_reminders(as_of=paris(2027, 1, 11, 9))
    assert opening.claimed == 1
    wait_reminders(weekend, 1)
    # Its next one: 7 days after the invitation, Tuesday 17:00.
    assert stored(weekend).next_reminder_at == paris(2027, 1, 12, 17)

    # Nothing ran on Tuesday until 20:00: both reminders due that day wait for Wednesday.
    tuesday = run_reminders(as_of=paris(2027, 1, 12, 20))
    assert (tuesday.claimed, tuesday.postponed) == (0, 2)
    assert stored(evening).next_reminder_at == paris(2027, 1, 13, 9)
    assert stored(weekend).next_reminder_at == paris(2027, 1, 13, 9)
    assert deliveries(evening, "reminder") == []
    assert len(deliveries(weekend, "reminder")) == 1

    wednesday = run_reminders(as_of=paris(2027, 1, 13, 9))
    assert wednesday.claimed == 2
    wait_reminders(evening, 1)
    wait_reminders(weekend, 2)
    assert len(received(standin, "reminder", evening)) == 1
    assert len(received(standin, "reminder", weekend)) == 2


def test_no_reminder_once_signed_cancelled_or_rejected(own_database, worker, standin):
    signed = send_and_wait()
    cancelled = send_and_wait()
    open_ = send_and_wait()
    invited_at(MONDAY, signed["contract_id"], cancelled["contract_id"], open_["contract_id"])

    notify_signatories(
        contract_id=signed["contract_id"],
        legal_name=signed["company_name"],
        accepted_sections=["conditions", "tarifs"],
    )
    cancel_contract(contract_id=cancelled["contract_id"], reason="another space")
    # Bound to another company: refused by the actor, so the contract ends rejected.
    rejected = contract_payload(email=open_["email"])
    with pytest.raises(Rejected):
        send_contract(**rejected)
    from actors import broker

    broker.get_actor("send_contract").send(rejected)
    wait_for_contract(signed["contract_id"], lambda r: r.status == "signed" and all_emails_sent(2)(r))
    wait_for_contract(cancelled["contract_id"], lambda r: r.status == "cancelled")
    wait_for_contract(rejected["contract_id"], lambda r: r.status == "rejected")

    closed = [signed["contract_id"], cancelled["contract_id"], rejected["contract_id"]]
    for contract_id in closed:
        assert stored(contract_id).next_reminder_at is None
    for step, days in enumerate((3, 7, 14, 21, 35), start=1):
        report = run_reminders(as_of=MONDAY + timedelta(days=days))
        assert report.claimed == (1 if step <= 3 else 0), (days, report)
        if report.claimed:
            wait_reminders(open_["contract_id"], step)
    for contract_id in closed:
        assert deliveries(contract_id, "reminder") == []
        assert received(standin, "reminder", contract_id) == []
        assert stored(contract_id).reminder_count == 0
    assert len(received(standin, "reminder", open_["contract_id"])) == 3


@pytest.mark.parametrize("closing", ["signed", "cancelled"])
def test_reminder_claimed_before_the_contract_closes_is_not_sent(closing, own_database, worker, standin):
    payload = send_and_wait()
    contract_id = payload["contract_id"]
    invited_at(MONDAY, contract_id)
    settings = get_settings()
    # A sweep claimed the reminder and committed; its message has not been processed yet.
    with session_scope() as session:
        swept = sweep_due_reminders(
            session,
            now=MONDAY + timedelta(days=3),
            policy=settings.reminder_policy(),
            codes=settings.access_code_policy(),
            limit=10,
        )
    (reminder_id,) = swept.claimed
    assert delivery(reminder_id).status == "pending"

    if closing == "signed":
        notify_signatories(
            contract_id=contract_id,
            legal_name=payload["company_name"],
            accepted_sections=["conditions", "tarifs"],
        )
        wait_for_contract(
            contract_id, lambda r: r.status == "signed" and kind_sent("signed_notification", 1)(r)
        )
    else:
        cancel_contract(contract_id=contract_id)
        wait_for_contract(contract_id, lambda r: r.status == "cancelled")

    from actors.deliver_email import enqueue_deliveries

    enqueue_deliveries([reminder_id])
    wait_for_contract(
        contract_id,
        lambda r: [e.status for e in r.emails if e.kind == "reminder"] == ["cancelled"],
        what="the claimed reminder to be dropped",
    )
    assert delivery(reminder_id).attempts <= 1
    assert received(standin, "reminder", contract_id) == []
    assert stored(contract_id).next_reminder_at is None
    assert run_reminders(as_of=MONDAY + timedelta(days=30)).claimed == 0


def test_reminders_carry_codes_only_to_clients_who_never_logged_in(own_database, worker, standin):
    fresh = send_and_wait()["contract_id"]
    logged = send_and_wait()["contract_id"]
    invited_at(MONDAY, fresh, logged)
    with session_scope() as session:
        account = session.get(Account, stored(logged).account_id)
        assert account is not None
        account.first_login_at = MONDAY + timedelta(hours=1)
        session.add(account)
    (invitation,) = received(standin, "invitation", fresh)
    first_code = code_in(invitation)
    before = account_of(fresh)
    assert verifies(before, first_code)
    ttl = timedelta(days=get_settings().access_code_ttl_days)
    assert before.access_code_expires_at == MONDAY + ttl

    # Day 3: the code is still valid: the reminder repeats it, nothing is renewed.
    day3 = run_reminders(as_of=MONDAY + timedelta(days=3))
    assert (day3.claimed, day3.codes_renewed) == (2, 0)
    wait_reminders(fresh, 1)
    wait_reminders(logged, 1)
    after = account_of(fresh)
    assert (after.access_code_hash, after.access_code_nonce) == (
        before.access_code_hash,
        before.access_code_nonce,
    )
    assert code_in(received(standin, "reminder", fresh)[0]) == first_code
    assert code_in(received(standin, "reminder", logged)[0]) is None
    assert [d.includes_access_code for d in deliveries(logged, "reminder")] == [False]

    # Day 7, an hour after the code expired: a new code, and the old one stops working.
    day7 = MONDAY + timedelta(days=7, hours=1)
    report = run_reminders(as_of=day7)
    assert (report.claimed, report.codes_renewed) == (2, 1)
    wait_reminders(fresh, 2)
    wait_reminders(logged, 2)
    renewed = account_of(fresh)
    second_code = code_in(received(standin, "reminder", fresh)[1])
    assert second_code is not None and second_code != first_code
    assert renewed.access_code_issued_at == day7
    assert renewed.access_code_expires_at == day7 + ttl
    assert verifies(renewed, second_code)
    assert not verifies(renewed, first_code)
    assert code_in(received(standin, "reminder", logged)[1]) is None

    # Day 14: the renewed code is valid until day 14 + 1 h: repeated, not renewed.
    day14 = run_reminders(as_of=MONDAY + timedelta(days=14))
    assert (day14.claimed, day14.codes_renewed) == (2, 0)
    wait_reminders(fresh, 3)
    wait_reminders(logged, 3)
    assert account_of(fresh).access_code_nonce == renewed.access_code_nonce
    assert code_in(received(standin, "reminder", fresh)[2]) == second_code
    assert code_in(received(standin, "reminder", logged)[2]) is None
    # The logged-in client's account never got a code from a reminder.
    assert account_of(logged).access_code_issued_at == MONDAY


def test_a_code_locked_by_wrong_attempts_is_renewed_by_the_next_reminder(own_database, worker, standin):
    """Otherwise the reminder repeats a code that cannot work until it expires."""
    from contract_dispatch import verify_code

    contract_id = send_and_wait()["contract_id"]
    invited_at(MONDAY, contract_id)
    (invitation,) = received(standin, "invitation", contract_id)
    first_code = code_in(invitation)
    assert first_code is not None
    email = stored(contract_id).email
    day2 = MONDAY + timedelta(days=2)
    wrong = ("3" if first_code[0] != "3" else "4") + first_code[1:]
    for _ in range(get_settings().access_code_max_attempts):
        assert not verify_code(email, wrong, now=day2)
    assert not verify_code(email, first_code, now=day2), "the code was not locked"

    day3 = run_reminders(as_of=MONDAY + timedelta(days=3))
    assert (day3.claimed, day3.codes_renewed) == (1, 1)
    wait_reminders(contract_id, 1)
    second_code = code_in(received(standin, "reminder", contract_id)[0])
    assert second_code is not None and second_code != first_code
    renewed = account_of(contract_id)
    assert renewed.access_code_failed_attempts == 0
    assert verifies(renewed, second_code) and not verifies(renewed, first_code)
    assert verify_code(email, second_code, now=MONDAY + timedelta(days=3, hours=1))


# -- two sweeps at once, in two processes ------------------------------------------------

#: Due contracts for the concurrent sweeps.
CONCURRENT_CONTRACTS = 50

#: A sweep in its own process: ready once connected, then sweeps when told to.
SWEEP_PROCESS = """
import json, sys
from datetime import datetime
import actors  # the broker connection
from workers.database import get_engine
from workers.reminders import run_sweep
get_engine()
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(run_sweep(as_of=datetime.fromisoformat(sys.argv[1])).as_dict()), flush=True)
"""


def test_two_sweep_processes_at_once_send_each_reminder_once(own_database, cli_env, worker, standin):
    payloads = [contract_payload() for _ in range(CONCURRENT_CONTRACTS)]
    for payload in payloads:
        send_contract(**payload)
    ids = [payload["contract_id"] for payload in payloads]

    def invitations_sent() -> bool:
        with session_scope() as session:
            sent = session.exec(
                select(EmailDelivery.id).where(
                    col(EmailDelivery.contract_id).in_(ids), EmailDelivery.status == "sent"
                )
            ).all()
            return len(sent) == len(ids)

    wait_until(invitations_sent, timeout=60, what="every invitation sent")
    invited_at(MONDAY, *ids)
    # After the codes expired: each claim also renews a code (an argon2 hash), which
    # keeps both sweeps busy long enough to overlap.
    as_of = MONDAY + timedelta(days=7, hours=1)

    env = {**cli_env, "REMINDER_BATCH_SIZE": "5"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SWEEP_PROCESS, as_of.isoformat()],
            env=env,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.strip() == "ready", (line, process.stderr.read() if process.stderr else "")
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    reports = []
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))

    assert sum(report["claimed"] for report in reports) == CONCURRENT_CONTRACTS, reports
    assert sum(report["codes_renewed"] for report in reports) == CONCURRENT_CONTRACTS, reports
    with session_scope() as session:
        sweeps = session.exec(select(ReminderSweep)).all()
        assert len(sweeps) == 2
        # They really ran at the same time.
        assert max(s.started_at for s in sweeps) < min(s.finished_at for s in sweeps if s.finished_at), sweeps
        reminders = session.exec(
            select(EmailDelivery).where(
                col(EmailDelivery.contract_id).in_(ids), EmailDelivery.kind == "reminder"
            )
        ).all()
        assert sorted((r.contract_id, r.step) for r in reminders) == sorted((i, 1) for i in ids)
        counts = session.exec(select(Contract.reminder_count).where(col(Contract.id).in_(ids))).all()
        assert counts == [1] * CONCURRENT_CONTRACTS

    def reminders_sent() -> bool:
        with session_scope() as session:
            sent = session.exec(
                select(EmailDelivery.id).where(
                    col(EmailDelivery.contract_id).in_(ids),
                    EmailDelivery.kind == "reminder",
                    EmailDelivery.status == "sent",
                )
            ).all()
            return len(sent) == len(ids)

    wait_until(reminders_sent, timeout=60, what="every reminder sent")
    references = [r.reference for contract_id in ids for r in received(standin, "reminder", contract_id)]
    assert len(references) == CONCURRENT_CONTRACTS
    assert len(set(references)) == CONCURRENT_CONTRACTS
    assert run_reminders(as_of=as_of).claimed == 0


# -- cancellation ------------------------------------------------------------------------


def test_cancel_contract_through_the_python_api(own_database, worker, standin, redis_server):
    payload = send_and_wait()
    contract_id = payload["contract_id"]
    invited_at(MONDAY, contract_id)
    assert run_reminders(as_of=MONDAY + timedelta(days=3)).claimed == 1
    wait_reminders(contract_id, 1)
    # An invitation sent again is recorded; its message has not been processed yet.
    pending_id = record_resend(contract_id)

    receipt = cancel_contract(contract_id=contract_id, reason="Le client a choisi un autre espace")
    assert receipt == Receipt(contract_id=contract_id, status="queued")
    report = wait_for_contract(contract_id, lambda r: r.status == "cancelled")
    assert report.cancelled_at is not None
    assert report.next_reminder_at is None
    assert stored(contract_id).cancel_reason == "Le client a choisi un autre espace"
    assert delivery(pending_id).status == "cancelled"
    # Its message arrives after the cancellation: nothing is sent.
    from workers.email.delivery import deliver

    assert deliver(pending_id) is Claim.CANCELLED
    assert delivery(pending_id).status == "cancelled"
    assert len(received(standin, "invitation", contract_id)) == 1

    for days in (7, 14, 21):
        assert run_reminders(as_of=MONDAY + timedelta(days=days)).claimed == 0
    assert len(received(standin, "reminder", contract_id)) == 1

    # Cancelling again is harmless: accepted, and the worker changes nothing.
    cancelled_at = stored(contract_id).cancelled_at
    again = cancel_contract(contract_id=contract_id, reason="twice")
    assert again.contract_id == contract_id
    from actors import cancel_contract as cancel_actor

    cancel_actor.send({"contract_id": contract_id, "reason": "three times"})
    client = redis_server.client()
    wait_until(lambda: messages_done(client, contract_id), what="the repeated cancels to be processed")
    contract = stored(contract_id)
    assert (contract.status, contract.cancelled_at) == ("cancelled", cancelled_at)
    assert contract.cancel_reason == "Le client a choisi un autre espace"

    with pytest.raises(Rejected) as unknown:
        cancel_contract(contract_id=unique("c"))
    assert unknown.value.code == "unknown_contract"


def test_a_contract_cancelled_while_queued_is_never_recorded_or_sent(database, standin, monkeypatch):
    """Cancelled before a worker took it: cancelled at once, and its send_contract, when a
    worker takes it, binds nothing and sends nothing (the worker that records a contract
    sends its invitation at once, so a queued cancel would come too late)."""
    import actors
    import contract_dispatch.producer
    from models.messages import WireMessage

    enqueued: list[WireMessage] = []
    # Kept out of the broker: the contract stays queued, as behind a busy worker.
    monkeypatch.setattr(contract_dispatch.producer, "_enqueue", enqueued.append)
    payload = contract_payload()
    contract_id = payload["contract_id"]
    assert send_contract(**payload).status == "queued"

    receipt = cancel_contract(contract_id=contract_id, reason="Erreur de saisie")
    assert receipt == Receipt(contract_id=contract_id, status="cancelled")
    assert [message.actor_name for message in enqueued] == ["send_contract"]
    contract = stored(contract_id)
    assert (contract.status, contract.cancel_reason) == ("cancelled", "Erreur de saisie")
    assert contract.cancelled_at is not None

    # A worker takes the send_contract message now.
    actors.send_contract.fn(enqueued[0].to_payload())
    assert stored(contract_id).status == "cancelled"
    assert deliveries(contract_id) == []
    assert received(standin, "invitation", contract_id) == []
    with session_scope() as session:
        assert session.exec(select(Account).where(Account.email == payload["email"])).first() is None
    # Cancelling it again is accepted and changes nothing.
    assert cancel_contract(contract_id=contract_id).status == "cancelled"
    assert stored(contract_id).cancel_reason == "Erreur de saisie"


def test_cancel_contract_on_the_command_line(own_database, cli_env, worker, standin, redis_server):
    contract_id = send_and_wait()["contract_id"]
    result = run_cli(cli_env, "cancel-contract", "--contract-id", contract_id, "--reason", "Budget gelé")
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout) == {"contract_id": contract_id, "status": "queued"}
    wait_for_contract(contract_id, lambda r: r.status == "cancelled")
    assert stored(contract_id).cancel_reason == "Budget gelé"
    again = run_cli(cli_env, "cancel-contract", "--contract-id", contract_id)
    assert again.returncode == 0, describe(again)
    wait_until(lambda: messages_done(redis_server.client(), contract_id), what="the second cancel")
    assert (stored(contract_id).status, stored(contract_id).cancel_reason) == ("cancelled", "Budget gelé")

    signed = send_and_wait()
    notify_signatories(
        contract_id=signed["contract_id"],
        legal_name=signed["company_name"],
        accepted_sections=["conditions", "tarifs"],
    )
    wait_for_contract(signed["contract_id"], lambda r: r.status == "signed")
    assert_refused(
        run_cli(cli_env, "cancel-contract", "--contract-id", signed["contract_id"]), "contract_closed"
    )
    assert stored(signed["contract_id"]).status == "signed"
    assert_refused(run_cli(cli_env, "cancel-contract", "--contract-id", unique("c")), "unknown_contract")
    missing = run_cli(cli_env, "cancel-contract")
    assert missing.returncode == 2 and "--contract-id" in missing.stderr, describe(missing)


def test_cancel_contract_as_a_raw_message(own_database, worker, standin, redis_server):
    contract_id = send_and_wait()["contract_id"]
    invited_at(MONDAY, contract_id)
    client = redis_server.client()
    enqueue_raw(
        client,
        get_settings().redis_namespace,
        actor="cancel_contract",
        args=[{"version": 1, "contract_id": contract_id}],
    )
    wait_for_contract(contract_id, lambda r: r.status == "cancelled")
    wait_until(lambda: messages_done(client, contract_id), what="the raw cancel to be processed")
    assert stored(contract_id).next_reminder_at is None
    assert run_reminders(as_of=MONDAY + timedelta(days=3)).claimed == 0
    assert deliveries(contract_id, "reminder") == []


# -- manual resend --------------------------------------------------------------------------


def test_resend_invitation_sends_a_new_step_and_restarts_the_cycle(own_database, cli_env, worker, standin):
    payload = send_and_wait()
    contract_id, email = payload["contract_id"], payload["email"]
    invited_at(MONDAY, contract_id)
    first_code = code_in(received(standin, "invitation", contract_id)[0])
    assert run_reminders(as_of=MONDAY + timedelta(days=3)).claimed == 1
    wait_reminders(contract_id, 1)
    assert stored(contract_id).reminder_count == 1

    before = utc_now()
    result = run_cli(cli_env, "resend-invitation", "--contract-id", contract_id)
    after = utc_now()
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout) == {"contract_id": contract_id, "status": "sent", "step": 1}
    wait_for_contract(contract_id, kind_sent("invitation", 2), what="the resent invitation")
    invitations = received(standin, "invitation", contract_id)
    assert [i.reference for i in invitations] == [
        f"invitation:{contract_id}:{email}:{step}" for step in (0, 1)
    ]
    assert invitations[1].body["subject"] == invitations[0].body["subject"]

    # The cycle starts again from the resend.
    contract = stored(contract_id)
    assert contract.reminder_count == 0
    assert contract.reminder_cycle_started_at is not None
    assert before <= contract.reminder_cycle_started_at <= after
    due = policy().next_in_window(contract.reminder_cycle_started_at + timedelta(days=3))
    assert contract.next_reminder_at == due
    # A client who never logged in gets a new code; the previous one stops working.
    second_code = code_in(invitations[1])
    assert second_code is not None and second_code != first_code
    account = account_of(contract_id)
    assert verifies(account, second_code)
    assert not verifies(account, first_code)

    # The new cycle's first reminder is due then, not before, and goes out.
    assert run_reminders(as_of=due - timedelta(seconds=1)).claimed == 0
    assert run_reminders(as_of=due).claimed == 1
    wait_reminders(contract_id, 2)
    reminders = received(standin, "reminder", contract_id)
    # Steps count on across cycles: the new reminder is a new email, not the first one again.
    assert [r.reference for r in reminders] == [f"reminder:{contract_id}:{email}:{step}" for step in (1, 2)]
    assert code_in(reminders[1]) == second_code

    # Through the Python API: the next step.
    assert resend_invitation(contract_id).step == 2
    wait_for_contract(contract_id, kind_sent("invitation", 3))

    notify_signatories(
        contract_id=contract_id,
        legal_name=payload["company_name"],
        accepted_sections=["conditions", "tarifs"],
    )
    wait_for_contract(contract_id, lambda r: r.status == "signed")
    assert_refused(run_cli(cli_env, "resend-invitation", "--contract-id", contract_id), "contract_closed")

    cancelled = send_and_wait()["contract_id"]
    cancel_contract(contract_id=cancelled)
    wait_for_contract(cancelled, lambda r: r.status == "cancelled")
    assert_refused(run_cli(cli_env, "resend-invitation", "--contract-id", cancelled), "contract_closed")
    with pytest.raises(Rejected) as refused:
        resend_invitation(cancelled)
    assert refused.value.code == "contract_closed"
    assert len(received(standin, "invitation", cancelled)) == 1
    assert_refused(run_cli(cli_env, "resend-invitation", "--contract-id", unique("c")), "unknown_contract")


def test_a_resend_replaces_an_earlier_step_still_waiting_to_go_out(own_database, worker, standin):
    """A step whose message was lost (recorded, never enqueued: a broker outage) would go
    out late beside the next one, with the temporary password the next one replaces."""
    from workers.email.delivery import deliver

    contract_id = send_and_wait()["contract_id"]
    lost = record_resend(contract_id)

    assert resend_invitation(contract_id).step == 2
    wait_for_contract(
        contract_id,
        lambda r: [e.status for e in r.emails if e.kind == "invitation"] == ["sent", "cancelled", "sent"],
        what="the new step sent, the one it replaces cancelled",
    )
    replaced = delivery(lost)
    assert (replaced.status, replaced.last_error) == ("cancelled", "replaced by invitation step 2")
    # Its message, should it come after all, sends nothing.
    assert deliver(lost) is Claim.CANCELLED
    steps = [(r.reference or "").rsplit(":", 1)[1] for r in received(standin, "invitation", contract_id)]
    assert steps == ["0", "2"]


# -- emails whose message was lost ---------------------------------------------------------


def test_a_sweep_whose_enqueue_fails_records_what_it_claimed(own_database, worker, standin, monkeypatch):
    from workers import reminders as sweeping

    contract_id = send_and_wait()["contract_id"]
    invited_at(paris(2027, 1, 5, 10), contract_id)  # Tuesday: due Friday 10:00

    refused = "Error 111 connecting to 127.0.0.1:6379. Connection refused."

    def broker_down(delivery_ids: Any) -> None:
        raise redis.ConnectionError(refused)

    monkeypatch.setattr(sweeping, "_enqueue", broker_down)
    with pytest.raises(redis.ConnectionError):
        run_reminders(as_of=paris(2027, 1, 8, 10))
    with session_scope() as session:
        row = session.exec(select(ReminderSweep).order_by(col(ReminderSweep.id).desc())).first()
    assert row is not None and row.as_of == paris(2027, 1, 8, 10)
    assert (row.claimed, row.error) == (1, f"ConnectionError: {refused}")
    (claimed,) = deliveries(contract_id, "reminder")
    assert claimed.status == "pending", "claimed and committed: a later sweep re-drives it"


def test_sweep_sends_a_pending_email_whose_message_was_lost(own_database, worker, standin):
    lost_contract = send_and_wait()
    fresh_contract = send_and_wait()
    # Recorded, committed, and never enqueued (the broker lost the message).
    lost = record_resend(lost_contract["contract_id"])
    fresh = record_resend(fresh_contract["contract_id"])
    table = table_of(EmailDelivery)
    with session_scope() as session:
        session.execute(
            update(table).where(table.c.id == lost).values(updated_at=utc_now() - timedelta(hours=2))
        )

    report = run_reminders()
    assert (report.redriven, report.claimed) == (1, 0)
    wait_for_contract(lost_contract["contract_id"], kind_sent("invitation", 2), what="the lost email sent")
    again = run_reminders()
    assert again.redriven == 0
    sent = received(standin, "invitation", lost_contract["contract_id"])
    assert [r.reference for r in sent] == [
        f"invitation:{lost_contract['contract_id']}:{lost_contract['email']}:{step}" for step in (0, 1)
    ]
    assert delivery(lost).attempts == 1
    # An email pending for a moment only is not taken for lost.
    assert (delivery(fresh).status, delivery(fresh).attempts) == ("pending", 0)
    assert len(received(standin, "invitation", fresh_contract["contract_id"])) == 1


# -- the schema of an earlier version ----------------------------------------------------------


def _old_schema(dialect_name: str) -> list[str]:
    """The DDL of the tables before issue 4: ``contracts`` without its reminder columns."""
    dialect = sqlite.dialect() if dialect_name == "sqlite" else postgresql.dialect()
    statements = [str(CreateTable(table_of(Account)).compile(dialect=dialect))]
    contracts = str(CreateTable(table_of(Contract)).compile(dialect=dialect))
    kept = [line for line in contracts.splitlines() if not line.strip().startswith(REMINDER_COLUMNS)]
    assert len(kept) == len(contracts.splitlines()) - len(REMINDER_COLUMNS)
    statements.append("\n".join(kept))
    statements.append(str(CreateTable(table_of(EmailDelivery)).compile(dialect=dialect)))
    return statements


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("upgrade", ["create_tables", "get_engine"])
def test_database_of_an_earlier_version_is_upgraded(dialect, upgrade, tmp_path):
    if dialect == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{tmp_path / 'old.db'}"])
    else:
        urls = _postgres_schema_url()
    url = next(urls)
    try:
        from sqlalchemy import create_engine

        from workers.database import normalize_database_url

        old = create_engine(normalize_database_url(url))
        with old.begin() as connection:
            for statement in _old_schema(dialect):
                connection.execute(text(statement))
            connection.execute(
                text(
                    "INSERT INTO contracts (id, status, content_hash, workspace_id, email, company_name,"
                    " lead_source, locale, sections, signatories, access_code_issued, created_at, updated_at)"
                    " VALUES ('old-1', 'sent', '', 'ws', 'old@example.com', 'Old SA', 'bap', 'fr',"
                    " '[]', '[]', false, '2026-01-05 10:00:00', '2026-01-05 10:00:00')"
                )
            )
        old.dispose()
        assert "next_reminder_at" not in {
            c["name"] for c in inspect(create_engine(normalize_database_url(url))).get_columns("contracts")
        }

        if upgrade == "create_tables":
            engine = create_engine(normalize_database_url(url))
            create_tables(engine)
            create_tables(engine)  # a second start finds nothing to add
        else:
            engine = get_engine(url)
        inspector = inspect(engine)
        columns = {c["name"] for c in inspector.get_columns("contracts")}
        assert set(REMINDER_COLUMNS) <= columns
        assert "reminder_sweeps" in inspector.get_table_names()
        assert any(
            index["column_names"] == ["next_reminder_at"] for index in inspector.get_indexes("contracts")
        )
        assert any(
            index["column_names"] == ["status", "next_reminder_at"]
            for index in inspector.get_indexes("contracts")
        )

        reminders = default_policy()
        with Session(engine) as session:
            old_contract = session.get(Contract, "old-1")
            assert old_contract is not None
            assert (old_contract.reminder_count, old_contract.next_reminder_at) == (0, None)
            assert old_contract.cancelled_at is None
            new = Contract(
                id="new-1", status="sent", email="new@example.com", company_name="New SA", lead_source="bap"
            )
            start_cycle(new, now=MONDAY, policy=reminders)
            session.add(new)
            session.commit()
        with Session(engine) as session:
            settings = get_settings()
            swept = sweep_due_reminders(
                session,
                now=MONDAY + timedelta(days=3),
                policy=reminders,
                codes=settings.access_code_policy(),
                limit=10,
            )
            session.commit()
            assert len(swept.claimed) == 1
            counts = dict(session.exec(select(Contract.id, Contract.reminder_count)).all())
            assert counts == {"new-1": 1, "old-1": 0}
        engine.dispose()
    finally:
        for _ in urls:
            pass


def test_a_sweep_hashes_its_renewed_codes_while_no_transaction_holds_the_write_lock(
    sqlite_database, standin, monkeypatch
):
    """Renewed codes are hashed before the batch's transaction, on the hasher's threads together:
    inside it, on SQLite, every worker's transaction waited for the whole batch's hashes."""
    payloads = [contract_payload() for _ in range(3)]
    for payload in payloads:
        actors.send_contract.fn(payload)
    invited_at(MONDAY, *(payload["contract_id"] for payload in payloads))
    enqueued: list[int] = []
    monkeypatch.setattr(workers.reminders, "_enqueue", enqueued.extend)
    day7 = MONDAY + timedelta(days=7, hours=1)
    report, calls = run_with_argon2_held(
        monkeypatch,
        partial(take_write_lock, sqlite_database),
        lambda: run_reminders(as_of=day7),
        method="hash_many",
    )
    assert (report.claimed, report.codes_renewed) == (3, 3)
    # The three codes in one call, hashed side by side.
    assert [len(plaintexts) for (plaintexts,) in calls] == [3]
    assert len(enqueued) == 3
    for payload in payloads:
        account = account_of(payload["contract_id"])
        assert account.access_code_issued_at == day7
        assert account.access_code_expires_at == day7 + timedelta(days=get_settings().access_code_ttl_days)
