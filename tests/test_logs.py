"""Log lines (issue 5, item 4): one structured line per message processed, and no secret in any line.

The same journey runs twice: through the in-process ``worker`` fixture, with a
handler at DEBUG on the root logger catching every record of this process; and
through a real ``contract-dispatch worker`` subprocess with ``LOG_FORMAT=json``
and ``LOG_LEVEL=DEBUG`` (Dramatiq's verbose mode), its stdout and stderr read
line by line, plus the stderr of the ``reminders run`` command it needs.

The journey: an invitation the provider first answers 503 twice (retried, then sent),
a contract signed and its signatory told, an invitation the provider refuses
(400: failed at once), a send the actor refuses (the email is bound to another
company), and a reminder sweep run as of a week later, which renews an expired
access code.

Each message must give exactly one "processed" line per attempt, with the right
outcome (done / retry / failed) and attempt number, and the fields ops filter on.
No line may hold an access code (learnt from the emails the SendGrid stand-in
received), the SendGrid API key, the SECRET_KEY, or any part of an email body
(the phrases below only ever appear in bodies, never in subjects).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from sqlmodel import col, select

import actors
from contract_dispatch import run_reminders
from models.account import Account
from models.contract import Contract
from models.delivery import EmailDelivery
from models.reminders import start_cycle
from models.status import ContractReport
from tests.conftest import TEST_SECRET_KEY, database_of_its_own
from tests.processes import CLI, WorkerProcess
from tests.sendgrid_standin import API_KEY, Answer, Received, SendGridStandIn
from tests.support import contract_payload, unique, wait_for_contract, wait_until
from tests.test_access_codes import wait_settled
from workers.database import session_scope
from workers.logs import RedactMessages
from workers.middleware.message_log import LOGGER_NAME
from workers.settings import get_settings

#: A Monday, 10:00 in Paris: the invitation is moved there, and the sweep runs a week
#: and an hour later (inside the sending window, after the 7-day code expired).
MONDAY = datetime(2027, 1, 4, 10, 0, tzinfo=ZoneInfo("Europe/Paris"))
SWEEP_AS_OF = MONDAY + timedelta(days=7, hours=1)

#: Text that appears in email bodies and never in a subject, payload or id.
BODY_ONLY = (
    "Accéder au contrat",  # the HTML button
    "Mot de passe temporaire",
    "Pour le consulter et le signer",
    "Le client a signé :",
    "https://app.example.com/contracts/",  # the link (APP_BASE_URL of the tests)
)

#: What the provider answers the refused invitation: its text may quote an address.
PROVIDER_ANSWER_TEXT = "mailbox of victim-7d2e@example.org is over quota"
PROVIDER_ANSWER = json.dumps({"errors": [{"message": PROVIDER_ANSWER_TEXT}]})

#: The fields of every "processed" line.
PROCESSED_FIELDS = {"message_id", "actor", "queue", "contract_id", "outcome", "duration_ms", "attempt"}

QUEUE_OF = {"send_contract": "contracts", "notify_signatories": "contracts", "deliver_email": "emails"}

_PASSWORD_LINE = re.compile(r"^\s*Mot de passe temporaire :\s*(\S+)\s*$", re.MULTILINE)

#: One command or one worker start never takes this long, in seconds.
COMMAND_TIMEOUT_SECONDS = 60
WORKER_START_SECONDS = 60


# -- the journey ------------------------------------------------------------------------


@dataclass
class Journey:
    """What the journey sent: contract ids by role, and the reminder sweep's report."""

    retried: str = ""
    refused_by_provider: str = ""
    refused_by_actor: str = ""
    reminded: str = ""
    sweep: dict[str, Any] = field(default_factory=dict)
    #: What the payloads carried that identifies a person or a company: never logged.
    personal: set[str] = field(default_factory=set)

    def sent(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Remember a send_contract payload's addresses and legal name; returns it."""
        self.personal |= {payload["email"], payload["company_name"]}
        self.personal |= {signatory["email"] for signatory in payload.get("signatories", [])}
        return payload

    @property
    def contract_ids(self) -> list[str]:
        return [self.retried, self.refused_by_provider, self.refused_by_actor, self.reminded]

    def line_count(self) -> int:
        """How many processed lines the journey makes."""
        return sum(len(lines) for messages in self.expected().values() for lines in messages)

    def expected(self) -> dict[str, list[list[tuple[str, str, int]]]]:
        """Per contract, each message's processed lines as (actor, outcome, attempt) by attempt."""
        return {
            self.retried: sorted(
                [
                    # The invitation's first attempt (503) is send_contract's; the
                    # deliver_email that takes it over meets the second 503.
                    [("send_contract", "done", 1)],
                    [("deliver_email", "retry", 2), ("deliver_email", "done", 3)],  # the invitation
                    [("notify_signatories", "done", 1)],
                    [("deliver_email", "done", 1)],  # the signatory's notification
                ]
            ),
            # Refused (400) on its first attempt: a deliver_email files the dead letter.
            self.refused_by_provider: sorted(
                [[("send_contract", "done", 1)], [("deliver_email", "failed", 1)]]
            ),
            self.refused_by_actor: [[("send_contract", "failed", 1)]],
            self.reminded: sorted(
                [
                    [("send_contract", "done", 1)],  # the invitation sent with it
                    [("deliver_email", "done", 1)],  # the reminder
                ]
            ),
        }


class Driver:
    """How the journey reaches a worker: enqueue a public message, run a sweep."""

    def enqueue(self, actor_name: str, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    def sweep(self, as_of: datetime) -> dict[str, Any]:
        raise NotImplementedError


def emails_are(*statuses: str) -> Callable[[ContractReport], bool]:
    return lambda report: sorted(email.status for email in report.emails) == sorted(statuses)


def invited_at(at: datetime, contract_id: str) -> None:
    """Record the invitation as sent at ``at``: the reminder cycle and the access code start then."""
    settings = get_settings()
    with session_scope() as session:
        contract = session.get(Contract, contract_id, with_for_update=True)
        assert contract is not None and contract.status == "sent"
        contract.sent_at = at
        start_cycle(contract, now=at, policy=settings.reminder_policy())
        session.add(contract)
        account = session.get(Account, contract.account_id)
        assert account is not None and account.access_code_issued_at is not None
        account.access_code_issued_at = at
        account.access_code_expires_at = at + timedelta(days=settings.access_code_ttl_days)
        session.add(account)


def run_journey(driver: Driver, standin: SendGridStandIn) -> Journey:
    """The journey, one step at a time, so each scripted answer reaches the email it is meant for."""
    journey = Journey()

    # An invitation the provider answers 503 twice: retried, then sent; then signed.
    retried = journey.sent(contract_payload(title="Bureau privatif A"))
    journey.retried = retried["contract_id"]
    standin.script(*[Answer(status=503, body=PROVIDER_ANSWER.encode(), kind="503")] * 2)
    driver.enqueue("send_contract", retried)
    wait_for_contract(journey.retried, emails_are("sent"), what="the retried invitation")
    driver.enqueue(
        "notify_signatories",
        {
            "contract_id": journey.retried,
            "legal_name": retried["company_name"],
            "accepted_sections": [section["id"] for section in retried["sections"]],
            "signer_name": "Camille Martin",
        },
    )
    wait_for_contract(journey.retried, emails_are("sent", "sent"), what="the signatory's notification")

    # A reminder a week after the invitation, once the access code expired: a new code.
    reminded = journey.sent(contract_payload())
    journey.reminded = reminded["contract_id"]
    driver.enqueue("send_contract", reminded)
    wait_for_contract(journey.reminded, emails_are("sent"), what="the invitation to remind")
    invited_at(MONDAY, journey.reminded)
    journey.sweep = driver.sweep(SWEEP_AS_OF)
    # Which contracts the sweep reminded: this journey's one, and none of its others. A
    # contract of another test may be there too: the suite's in-process worker follows
    # the process's DATABASE_URL, and a message of another test's (a delayed retry)
    # can land in this database; it is named in the message if the counts disagree.
    with session_scope() as session:
        reminded_ids = set(
            session.exec(select(EmailDelivery.contract_id).where(EmailDelivery.kind == "reminder")).all()
        )
        foreign = {
            contract.id: (contract.status, contract.created_at, contract.workspace_id)
            for contract in session.exec(select(Contract).where(col(Contract.id).in_(reminded_ids)))
            if contract.id not in (journey.reminded, journey.retried)
        }
    assert journey.reminded in reminded_ids and journey.retried not in reminded_ids, (
        reminded_ids,
        journey.sweep,
    )
    assert journey.sweep["claimed"] == 1 + len(foreign), (journey.sweep, foreign)
    assert 1 <= journey.sweep["codes_renewed"] <= 1 + len(foreign), (journey.sweep, foreign)
    wait_for_contract(journey.reminded, emails_are("sent", "sent"), what="the reminder")

    # An invitation the provider refuses: failed at once.
    refused = journey.sent(contract_payload())
    journey.refused_by_provider = refused["contract_id"]
    # Its answer quotes the email, temporary password included: kept on the email and
    # its dead letter, the password must not be.
    standin.script(Answer(status=400, body=PROVIDER_ANSWER.encode(), kind="400", quoting="Mot de passe"))
    driver.enqueue("send_contract", refused)
    wait_for_contract(journey.refused_by_provider, emails_are("failed"), what="the refused invitation")

    # The first client's email with another company: the actor refuses it.
    other = journey.sent(
        contract_payload(email=retried["email"], company_name=f"Autre {uuid.uuid4().hex[:6]} SAS")
    )
    journey.refused_by_actor = other["contract_id"]
    driver.enqueue("send_contract", other)
    report = wait_for_contract(
        journey.refused_by_actor, lambda r: r.status == "rejected", what="the refused send"
    )
    assert report.error is not None and report.error.code == "email_bound_to_other_company"
    return journey


# -- what the logs must and must not hold -------------------------------------------------


def secrets_sent(requests: list[Received]) -> tuple[set[str], list[str]]:
    """The access codes the emails carried, and every email body (text and HTML)."""
    codes: set[str] = set()
    bodies: list[str] = []
    for request in requests:
        text = request.content("text/plain")
        bodies += [text, request.content("text/html")]
        codes.update(_PASSWORD_LINE.findall(text))
    return codes, bodies


def assert_no_secret(lines: list[str], requests: list[Received], journey: Journey) -> None:
    codes, bodies = secrets_sent(requests)
    # The three clients' codes, the reminded one's twice (renewed): four distinct codes
    # in the journey's own emails. Every code the stand-in saw is searched for below:
    # the suite's in-process worker may deliver another test's late email meanwhile.
    own = [r for r in requests if r.reference and r.reference.split(":")[1] in journey.contract_ids]
    own_codes, _ = secrets_sent(own)
    assert len(own_codes) == 4, own_codes
    for marker in BODY_ONLY:
        assert any(marker in body for body in bodies), f"{marker!r} is in no email body: pick another marker"
        assert not any(marker in request.body.get("subject", "") for request in requests), marker
    forbidden = {
        **{f"access code {code}": code for code in codes},
        "the SendGrid API key": API_KEY,
        "the SECRET_KEY": TEST_SECRET_KEY,
        **{f"email body text {marker!r}": marker for marker in BODY_ONLY},
        **{f"payload value {value!r}": value for value in journey.personal},
        "the provider's answer": PROVIDER_ANSWER_TEXT,
    }
    leaks = [
        f"{what} in: {line[:300]}" for line in lines for what, value in forbidden.items() if value in line
    ]
    assert not leaks, "\n".join(leaks[:20])
    # The capture is the real thing: the journey's contracts do show up in it.
    assert all(any(contract_id in line for line in lines) for contract_id in journey.contract_ids)


def assert_processed_lines(processed: list[dict[str, Any]], journey: Journey) -> None:
    """Exactly the expected lines for the journey's contracts, each with every field."""
    for line in processed:
        missing = PROCESSED_FIELDS - set(line)
        assert not missing, f"{missing} missing from {line}"
    mine = [line for line in processed if line["contract_id"] in journey.contract_ids]
    by_message: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in mine:
        assert line["queue"] == QUEUE_OF[line["actor"]], line
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0, line
        assert isinstance(line["attempt"], int), line
        # A failed attempt names its exception's type, never its message.
        assert ("error" in line) == (line["outcome"] != "done"), line
        by_message[line["message_id"]].append(line)
    found: dict[str, list[list[tuple[str, str, int]]]] = defaultdict(list)
    for lines in by_message.values():
        (contract_id,) = {line["contract_id"] for line in lines}
        attempts = sorted((line["attempt"], line["actor"], line["outcome"]) for line in lines)
        found[contract_id].append([(actor, outcome, attempt) for attempt, actor, outcome in attempts])
    assert {contract_id: sorted(messages) for contract_id, messages in found.items()} == journey.expected()
    errors = {
        (line["actor"], line["outcome"]): line.get("error") for line in mine if line["outcome"] != "done"
    }
    assert errors == {
        ("deliver_email", "retry"): "ProviderUnavailable",
        ("deliver_email", "failed"): "ProviderRejected",
        ("send_contract", "failed"): "EmailBoundToOtherCompany",
    }


def count_mine(processed: list[dict[str, Any]], journey: Journey) -> int:
    return sum(1 for line in processed if line.get("contract_id") in journey.contract_ids)


# -- in this process, on the worker fixture ------------------------------------------------


@pytest.fixture
def own_database(database: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database of the same kind as ``database``, made this process's (the sweep sees only ours)."""
    with database_of_its_own(database, tmp_path / "logs.db") as url:
        yield url


class InProcess(Driver):
    def enqueue(self, actor_name: str, payload: dict[str, Any]) -> None:
        getattr(actors, actor_name).send(payload)

    def sweep(self, as_of: datetime) -> dict[str, Any]:
        return run_reminders(as_of=as_of).as_dict()


def test_in_process_lines_one_per_message_and_no_secret(
    own_database, worker, standin, redis_server, root_at_debug
):
    # As a worker process's logging setup does for its handlers (workers.logs.apply_log_format).
    root_at_debug.addFilter(RedactMessages())
    journey = run_journey(InProcess(), standin)
    # Acked means its after-hooks ran: every line of the journey is in.
    wait_settled(redis_server.client(), *journey.contract_ids)
    wait_until(
        lambda: count_mine(root_at_debug.processed, journey) >= journey.line_count(),
        what="the journey's processed lines",
    )
    assert_processed_lines(root_at_debug.processed, journey)
    assert_no_secret(root_at_debug.lines, list(standin.requests), journey)
    # DEBUG really was on: Dramatiq's own debug lines are in the capture.
    assert any('"level": "DEBUG"' in line for line in root_at_debug.lines)


# -- a worker subprocess, LOG_FORMAT=json at DEBUG ---------------------------------------------


class Subprocess(Driver):
    """Enqueues as a producer without Python does (README), sweeps with ``reminders run``."""

    def __init__(self, env: dict[str, str], client: redis.Redis, namespace: str) -> None:
        self.env = env
        self.client = client
        self.namespace = namespace
        self.command_logs: list[str] = []

    def enqueue(self, actor_name: str, payload: dict[str, Any]) -> None:
        queue = QUEUE_OF[actor_name]
        message_id = str(uuid.uuid4())
        message = {
            "queue_name": queue,
            "actor_name": actor_name,
            "args": [payload],
            "kwargs": {},
            "options": {"redis_message_id": message_id},
            "message_id": message_id,
            "message_timestamp": int(time.time() * 1000),
        }
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(f"{self.namespace}:{queue}.msgs", message_id, json.dumps(message))
            pipe.rpush(f"{self.namespace}:{queue}", message_id)
            pipe.execute()

    def sweep(self, as_of: datetime) -> dict[str, Any]:
        result = subprocess.run(
            [CLI, "reminders", "run", "--now", as_of.isoformat()],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
        self.command_logs += result.stderr.splitlines()
        assert result.returncode == 0, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report


def parse_json_lines(text: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Every line, and those that are JSON objects."""
    lines = text.splitlines()
    objects = []
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return lines, objects


def debug_worker_env(
    test_environment: dict[str, str],
    tmp_path: Path,
    *,
    namespace: str,
    database_url: str,
    standin: SendGridStandIn,
    log_format: str,
) -> dict[str, str]:
    """A worker's environment at DEBUG on a namespace, database and stand-in of the test's own."""
    return {
        **os.environ,
        **test_environment,
        "DATA_DIR": str(tmp_path / "data"),
        "REDIS_NAMESPACE": namespace,
        "DATABASE_URL": database_url,
        "SENDGRID_API_HOST": standin.url,
        "LOG_FORMAT": log_format,
        "LOG_LEVEL": "DEBUG",
        # No metrics endpoint: its fixed port may be taken by another test's worker.
        "METRICS_PORT": "0",
    }


def test_worker_subprocess_json_lines_one_per_message_and_no_secret(
    test_environment, redis_server, sqlite_database, private_standin, tmp_path
):
    namespace = unique("logs")
    env = debug_worker_env(
        test_environment,
        tmp_path,
        namespace=namespace,
        database_url=sqlite_database,
        standin=private_standin,
        log_format="json",
    )
    client = redis_server.client()
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log", processes=1, threads=2).start()
    driver = Subprocess(env, client, namespace)
    try:
        journey = run_journey(driver, private_standin)

        def lines_in() -> bool:
            _, objects = parse_json_lines(worker.log())
            processed = [o for o in objects if o.get("logger") == LOGGER_NAME]
            return count_mine(processed, journey) >= journey.line_count()

        wait_until(lines_in, timeout=WORKER_START_SECONDS, what="the journey's processed lines")
    finally:
        # A graceful stop flushes whatever the worker processes still had to write.
        if worker.alive():
            worker.terminate()
        client.delete(*(client.keys(f"{namespace}:*") or [f"{namespace}:none"]))
    lines, objects = parse_json_lines(worker.log())
    processed = [o for o in objects if o.get("logger") == LOGGER_NAME]
    assert_processed_lines(processed, journey)
    assert any(o.get("level") == "DEBUG" for o in objects), "the worker did not log at DEBUG"
    # Every line is JSON but those Dramatiq writes before the service's code is loaded:
    # its supervisor's own lines, and a worker process's "Loading broker...".
    not_json = [line for line in lines if not line.startswith("{")]
    assert all("[dramatiq.MainProcess]" in line or line.endswith("Loading broker...") for line in not_json), (
        not_json
    )
    _, command_objects = parse_json_lines("\n".join(driver.command_logs))
    assert any("Reminder sweep" in o.get("message", "") for o in command_objects), driver.command_logs
    assert_no_secret(lines + driver.command_logs, list(private_standin.requests), journey)
