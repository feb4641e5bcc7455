"""``contract-dispatch demo``: the whole journey on the embedded defaults.

Registers a workspace, sends a sample contract, runs a worker in this process
until the invitation is delivered, signs the contract, waits for the managers'
notifications, then prints where the emails landed and the final status.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import dramatiq

from contract_dispatch import contract_status, notify_signatories, send_contract, set_workspace
from models.status import ContractReport
from workers import embedded_redis
from workers.settings import get_settings

#: How often the demo looks at the contract while it waits, in seconds.
POLL_INTERVAL_SECONDS = 0.1

#: The worker's idle poll, in milliseconds: short, so the demo does not linger.
DEMO_WORKER_TIMEOUT_MS = 100


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _wait_for(
    contract_id: str, what: str, done: Callable[[ContractReport], bool], *, deadline: float
) -> ContractReport:
    last_line = ""
    while True:
        report = contract_status(contract_id)
        if report is not None and done(report):
            return report
        states = ["contract not recorded yet"]
        if report is not None:
            states = [f"contract {report.status}", *(f"{e.kind} to {e.to} {e.status}" for e in report.emails)]
        line = f"  waiting for {what}: " + ", ".join(states)
        if line != last_line:
            _say(line)
            last_line = line
        if report is not None and report.status == "rejected" and report.error is not None:
            raise RuntimeError(f"the contract was refused: {report.error.code}: {report.error.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(POLL_INTERVAL_SECONDS)


def _all_sent(kind: str) -> Callable[[ContractReport], bool]:
    def check(report: ContractReport) -> bool:
        emails = [email for email in report.emails if email.kind == kind]
        return bool(emails) and all(email.status == "sent" for email in emails)

    return check


def run_demo(*, timeout: float) -> int:
    settings = get_settings()
    deadline = time.monotonic() + timeout
    started_redis = False
    if not settings.redis_url:
        _, started_redis = embedded_redis.ensure_running(settings.data_dir)
        _say(f"Embedded Redis under {settings.data_dir / 'redis'}")
    from sqlalchemy.engine import make_url

    _say(f"Database: {make_url(settings.effective_database_url).render_as_string(hide_password=True)}")
    _say(f"Email backend: {settings.email_backend}")

    import actors

    worker = dramatiq.Worker(actors.broker, worker_threads=4, worker_timeout=DEMO_WORKER_TIMEOUT_MS)
    worker.start()
    try:
        set_workspace("demo-workspace", ["paris-11", "lyon-part-dieu"])
        contract_id = "demo-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        sections = [
            {"id": "conditions", "title": "Conditions générales"},
            {"id": "tarifs", "title": "Tarifs"},
            {"id": "reglement", "title": "Règlement intérieur"},
        ]
        receipt = send_contract(
            contract_id=contract_id,
            email="camille.martin@example.com",
            company_name="Atelier Martin SARL",
            lead_source="bap",
            workspace_id="demo-workspace",
            resource_group_id="paris-11",
            signatories=[
                {"email": "manager@example.com", "name": "Claire Manager"},
                {"email": "direction@example.com", "name": "Direction"},
            ],
            sections=sections,
            title="Bureau privatif, 4 postes",
        )
        _say(f"1. Sent contract {receipt.contract_id}: {receipt.status}")
        _wait_for(contract_id, "the invitation", _all_sent("invitation"), deadline=deadline)
        _say("2. Invitation delivered")

        notify_signatories(
            contract_id=contract_id,
            legal_name="Atelier Martin SARL",
            accepted_sections=[section["id"] for section in sections],
            registration_number="123 456 789",
            signer_name="Camille Martin",
        )
        report = _wait_for(
            contract_id, "the signed notifications", _all_sent("signed_notification"), deadline=deadline
        )
        _say(f"3. Signed; {len([e for e in report.emails if e.kind == 'signed_notification'])} managers told")
    except Exception as exc:  # a demo ends with a readable line, not a traceback
        from workers.ops.health import describe_error, redact, secrets_of

        sys.stderr.write(f"demo failed: {redact(describe_error(exc), secrets_of(settings))}\n")
        return 1
    finally:
        worker.stop()
        if started_redis:
            embedded_redis.stop(settings.data_dir)

    _say("")
    _say("Emails:")
    for email in report.emails:
        where = (
            settings.effective_outbox_dir.resolve() / email.provider_message_id
            if settings.email_backend == "file" and email.provider_message_id
            else email.provider_message_id
        )
        _say(f"  {email.kind} to {email.to}: {email.status} -> {where}")
    _say("")
    _say("Final status:")
    from workers.cli_contract_status import status_json

    _say(json.dumps(status_json(report), ensure_ascii=False, indent=2))
    return 0 if report.status == "signed" else 1
