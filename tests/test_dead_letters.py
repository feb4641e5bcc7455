"""Dead letters that keep their reason (issue 3, item 2; DESIGN §5).

Messages die through the real broker and worker: a refused ``send_contract``, an
email the provider refuses, a message for an actor nobody declared, an email
whose retries run out. Each must leave exactly one SQL record with its reason
and one copy in Dramatiq's Redis dead-letter queue (``{ns}:{queue}.XQ`` and
``.XQ.msgs``), and ``contract-dispatch dead-letters`` (run as a subprocess, as
an operator runs it) must list, show, retry and purge them while keeping Redis
and SQL in step. A test only ever compares, retries or purges the messages it
killed itself; the one that needs Dramatiq to expire dead letters works in a Redis
namespace of its own, with a worker process of its own.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import dramatiq
import pytest
import redis
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select

import actors
from contract_dispatch import contract_status, send_contract, set_workspace
from models.dead_letter import DeadLetter
from models.delivery import EmailDelivery
from models.messages import DeliverEmail
from models.types import utc_now
from tests.processes import WorkerProcess, describe, run_cli
from tests.sendgrid_standin import API_KEY, Answer
from tests.support import (
    all_emails_sent,
    contract_payload,
    enqueue_raw,
    free_port,
    unique,
    wait_for_contract,
    wait_until,
)
from tests.test_access_codes import deliveries_of, requests_for, wait_settled
from workers import dead_letters
from workers.cli_dead_letters import as_json
from workers.database import get_engine, session_scope
from workers.middleware import maintenance
from workers.middleware.dead_letters import DeadLetters
from workers.redis_dispatch import run_maintenance
from workers.settings import get_settings

#: The worker subprocess has to boot before it takes anything.
SUBPROCESS_TIMEOUT_SECONDS = 40


# -- helpers ------------------------------------------------------------------


def run_side_by_side(env: dict[str, str], *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Several commands at once, results in the order given."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda command: run_cli(env, *command), commands))


def json_output(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


@pytest.fixture
def cli_env(test_environment: dict[str, str], database: str) -> dict[str, str]:
    """The CLI on the database and Redis namespace the ``worker`` fixture uses."""
    return {**os.environ, **test_environment, "DATABASE_URL": database}


def missing_actor() -> str:
    """An actor name no worker declares."""
    return f"no_such_actor_{uuid.uuid4().hex[:10]}"


def xq_keys(namespace: str, queue: str) -> tuple[str, str]:
    return f"{namespace}:{queue}.XQ", f"{namespace}:{queue}.XQ.msgs"


def redis_copy(
    client: redis.Redis, namespace: str, queue: str, redis_id: str | None
) -> dict[str, Any] | None:
    """The dead-letter queue's copy of a message, or None; its two keys must agree."""
    if redis_id is None:
        return None
    xq, msgs = xq_keys(namespace, queue)
    raw = client.hget(msgs, redis_id)
    assert (raw is not None) == (client.zscore(xq, redis_id) is not None), (
        f"{xq} and {msgs} disagree about {redis_id}"
    )
    return json.loads(raw) if raw is not None else None


def record_of(message_id: str) -> DeadLetter | None:
    with session_scope() as session:
        return session.exec(select(DeadLetter).where(DeadLetter.message_id == message_id)).first()


def wait_dead(message_id: str, *, newer_than: datetime | None = None, timeout: float = 20) -> DeadLetter:
    """Wait for the message's record to be dead (and to have died after ``newer_than``)."""
    found: list[DeadLetter] = []

    def check() -> bool:
        record = record_of(message_id)
        if record is None or record.status != "dead":
            return False
        if newer_than is not None and record.last_failed_at <= newer_than:
            return False
        found.append(record)
        return True

    wait_until(check, timeout=timeout, what=f"the dead letter of message {message_id}")
    return found[-1]


def deliver_email_record(delivery_id: int | None) -> DeadLetter | None:
    """The dead letter of the deliver_email message of one delivery (at most one)."""
    with session_scope() as session:
        records = session.exec(select(DeadLetter).where(DeadLetter.actor_name == "deliver_email")).all()
    matching = [
        r
        for r in records
        if r.message_args and isinstance(r.message_args[0], dict)
        if r.message_args[0].get("delivery_id") == delivery_id
    ]
    assert len(matching) <= 1, matching
    return matching[0] if matching else None


def wait_email_dead(delivery_id: int | None) -> DeadLetter:
    found = wait_until(
        lambda: deliver_email_record(delivery_id), what=f"the dead letter of delivery {delivery_id}"
    )
    assert found is not None
    return found


def invitation_dead(ledger: Ledger) -> tuple[dict[str, Any], EmailDelivery, DeadLetter]:
    """Send a contract whose invitation the provider (as the caller scripted it) fails for good.

    Returns the payload, the failed delivery and its dead letter (added to ``ledger``).
    """
    payload = contract_payload()
    send_contract(**payload)
    wait_for_contract(
        payload["contract_id"], lambda r: [e.status for e in r.emails] == ["failed"], what="the email to fail"
    )
    (delivery,) = deliveries_of(payload["contract_id"])
    record = wait_email_dead(delivery.id)
    ledger.add(record.message_id)
    return payload, delivery, record


def text_of(value: Any) -> str:
    """Redis answers bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def to_millisecond(moment: datetime) -> datetime:
    """Failure times travel in message options in whole milliseconds."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass
class Ledger:
    """The messages one test killed, to compare Redis and SQL on those only."""

    client: redis.Redis
    namespace: str
    message_ids: set[str] = field(default_factory=set)
    redis_ids: set[str] = field(default_factory=set)

    def add(self, message_id: str) -> str:
        self.message_ids.add(message_id)
        return message_id

    def assert_consistent(self) -> None:
        """Redis's dead-letter entries are exactly the SQL records that are dead."""
        with session_scope() as session:
            records = list(
                session.exec(select(DeadLetter).where(col(DeadLetter.message_id).in_(self.message_ids)))
            )
        expected = {
            (r.queue_name, r.redis_message_id) for r in records if r.status == "dead" and r.redis_message_id
        }
        self.redis_ids |= {redis_id for _, redis_id in expected}
        in_hash: set[tuple[str, str]] = set()
        in_zset: set[tuple[str, str]] = set()
        for queue in {"contracts", "emails"} | {r.queue_name for r in records}:
            xq, msgs = xq_keys(self.namespace, queue)
            for raw_id, raw in self.client.hgetall(msgs).items():
                if json.loads(raw)["message_id"] in self.message_ids:
                    in_hash.add((queue, text_of(raw_id)))
                    self.redis_ids.add(text_of(raw_id))
            in_zset |= {
                (queue, text_of(member))
                for member in self.client.zrange(xq, 0, -1)
                if text_of(member) in self.redis_ids
            }
        assert in_hash == expected, f"Redis .XQ.msgs {in_hash} != SQL dead records {expected}"
        assert in_zset == expected, f"Redis .XQ {in_zset} != SQL dead records {expected}"


@pytest.fixture
def ledger(redis_server, broker) -> Ledger:
    return Ledger(redis_server.client(), broker.namespace)


def assert_reason_kept(
    record: DeadLetter, *, actor: str, queue: str, args: list[Any], exception_type: str
) -> None:
    assert record.actor_name == actor
    assert record.queue_name == queue
    assert record.message_args == args
    assert record.message_kwargs == {}
    assert record.exception_type == exception_type
    assert record.exception_message.strip()
    assert record.status == "dead"
    assert record.retry_count == 0 and record.retried_at is None


# -- a permanent failure: one record with its reason, one Redis copy ------------


def test_refused_send_contract_leaves_one_dead_letter_with_its_reason(worker, broker, redis_server, ledger):
    payload = contract_payload(email="not-an-email")
    before = to_millisecond(utc_now())
    message = actors.send_contract.send(payload)
    ledger.add(message.message_id)
    record = wait_dead(message.message_id)
    after = utc_now()

    assert_reason_kept(
        record, actor="send_contract", queue="contracts", args=[payload], exception_type="InvalidEmail"
    )
    assert record.contract_id == payload["contract_id"]
    # The same reason the producer reads on the contract.
    report = contract_status(payload["contract_id"])
    assert report is not None and report.error is not None
    assert report.error.code == "invalid_email"
    assert record.exception_message == report.error.message
    assert record.traceback is not None and "InvalidEmail" in record.traceback
    # Refusals are never retried: one attempt, failed once.
    assert record.attempts == 1
    assert before <= record.first_failed_at <= record.last_failed_at <= after

    copy_ = redis_copy(redis_server.client(), broker.namespace, "contracts", record.redis_message_id)
    assert copy_ is not None, "no copy in Dramatiq's dead-letter queue under the record's redis_message_id"
    assert copy_["message_id"] == message.message_id
    assert copy_["actor_name"] == "send_contract"
    assert copy_["args"] == [payload]
    ledger.assert_consistent()


def test_provider_refusal_leaves_one_dead_letter_and_a_failed_delivery(
    worker, broker, standin, redis_server, ledger
):
    standin.script(Answer(status=400, body=b'{"errors":[{"message":"The to field is invalid."}]}'))
    payload = contract_payload()
    before = to_millisecond(utc_now())
    send_contract(**payload)
    wait_for_contract(
        payload["contract_id"], lambda r: [e.status for e in r.emails] == ["failed"], what="the email to fail"
    )
    (delivery,) = deliveries_of(payload["contract_id"])
    record = wait_email_dead(delivery.id)
    after = utc_now()
    ledger.add(record.message_id)

    assert_reason_kept(
        record,
        actor="deliver_email",
        queue="emails",
        args=[DeliverEmail(delivery_id=delivery.id).to_payload()],
        exception_type="ProviderRejected",
    )
    assert "400" in record.exception_message
    assert record.attempts == 1
    assert [r.status for r in requests_for(standin, f"invitation:{payload['contract_id']}:")] == [400]
    assert before <= record.first_failed_at <= record.last_failed_at <= after
    assert delivery.status == "failed" and delivery.last_error and "400" in delivery.last_error
    # Kept without secrets: the provider's API key appears nowhere in the record.
    assert API_KEY not in json.dumps(as_json(record, full=True), default=str)

    copy_ = redis_copy(redis_server.client(), broker.namespace, "emails", record.redis_message_id)
    assert copy_ is not None and copy_["message_id"] == record.message_id
    assert copy_["args"] == record.message_args
    wait_settled(redis_server.client(), payload["contract_id"])
    ledger.assert_consistent()


def test_message_for_an_unknown_actor_leaves_one_dead_letter(worker, broker, redis_server, ledger):
    client = redis_server.client()
    actor = missing_actor()
    args = [{"contract_id": unique("c")}]
    before = to_millisecond(utc_now())
    message_id = ledger.add(enqueue_raw(client, broker.namespace, queue="contracts", actor=actor, args=args))
    record = wait_dead(message_id)
    after = utc_now()

    assert_reason_kept(record, actor=actor, queue="contracts", args=args, exception_type="ActorNotFound")
    assert actor in record.exception_message
    assert record.contract_id == args[0]["contract_id"]
    assert record.attempts == 1
    assert before <= record.first_failed_at <= record.last_failed_at <= after
    # A message written raw keeps the Redis id its producer gave it.
    assert record.redis_message_id == message_id
    copy_ = redis_copy(client, broker.namespace, "contracts", message_id)
    assert copy_ is not None and copy_["actor_name"] == actor and copy_["args"] == args
    ledger.assert_consistent()


# -- retries exhausted, then retried by an operator ---------------------------


def test_exhausted_retries_count_every_attempt_and_retry_sends_once(
    worker, broker, standin, redis_server, cli_env, ledger
):
    client = redis_server.client()
    tries = get_settings().retry_policy("deliver_email").max_retries + 1
    assert tries == 4, "the session runs with MAX_RETRIES=3"
    standin.script(*[Answer(status=500, body=b'{"errors":[{"message":"try later"}]}')] * tries)
    payload, delivery, record = invitation_dead(ledger)
    prefix = f"invitation:{payload['contract_id']}:"

    # One attempt per request the provider saw: the first try and MAX_RETRIES retries.
    assert [r.status for r in requests_for(standin, prefix)] == [500] * tries
    assert record.attempts == tries
    assert record.first_failed_at < record.last_failed_at
    assert record.exception_type == "ProviderUnavailable" and "500" in record.exception_message
    assert record.contract_id == payload["contract_id"]  # the delivery's, its payload naming none
    assert delivery.status == "failed"
    assert delivery.last_error is not None and "500" in delivery.last_error
    old_redis_id = record.redis_message_id
    assert redis_copy(client, broker.namespace, "emails", old_redis_id) is not None
    ledger.assert_consistent()

    # The provider is back, except for one more 500: a fresh retry count rides it out
    # (with the exhausted count kept, that 500 would kill the message at once).
    standin.script(Answer(status=500, body=b'{"errors":[{"message":"still warming up"}]}'))
    result = run_cli(cli_env, "dead-letters", "retry", str(record.id))
    assert result.returncode == 0, describe(result)
    assert "retried 1" in result.stdout, describe(result)
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the retried email to be sent")
    wait_settled(client, payload["contract_id"])

    assert [r.status for r in requests_for(standin, prefix)] == [500] * (tries + 1) + [202]
    assert len(standin.accepted_for(prefix)) == 1
    retried = record_of(record.message_id)
    assert retried is not None and retried.id == record.id
    assert retried.status == "retried"
    assert retried.retry_count == 1 and retried.retried_at is not None
    assert retried.redis_message_id is None
    # The reason stays on the record after the retry.
    assert (retried.exception_type, retried.attempts) == ("ProviderUnavailable", tries)
    assert redis_copy(client, broker.namespace, "emails", old_redis_id) is None
    ledger.assert_consistent()


# -- the command line ---------------------------------------------------------


def test_list_and_show_print_the_records(worker, broker, redis_server, cli_env, ledger):
    client = redis_server.client()
    payload = contract_payload(email="not-an-email")
    refused = ledger.add(actors.send_contract.send(payload).message_id)
    actor = missing_actor()
    orphan_args = [{"contract_id": unique("c")}]
    orphan = ledger.add(
        enqueue_raw(client, broker.namespace, queue="contracts", actor=actor, args=orphan_args)
    )
    refused_record = wait_dead(refused)
    orphan_record = wait_dead(orphan)
    ledger.assert_consistent()

    # Read-only commands, run side by side to keep the test short.
    listing, by_actor_run, by_queue_run, table, shown_run, text, unknown = run_side_by_side(
        cli_env,
        ["dead-letters", "list", "--json"],
        ["dead-letters", "list", "--json", "--actor", actor],
        ["dead-letters", "list", "--json", "--queue", "emails"],
        ["dead-letters", "list", "--actor", "send_contract"],
        ["dead-letters", "show", str(refused_record.id), "--json"],
        ["dead-letters", "show", str(orphan_record.id)],
        ["dead-letters", "show", str(10**9), "--json"],
    )

    listed = json_output(listing)
    by_message = {entry["message_id"]: entry for entry in listed}
    entry = by_message[refused]
    assert entry["id"] == refused_record.id
    assert (entry["actor"], entry["queue"], entry["contract_id"]) == (
        "send_contract",
        "contracts",
        payload["contract_id"],
    )
    assert (entry["exception_type"], entry["exception_message"]) == (
        "InvalidEmail",
        refused_record.exception_message,
    )
    assert entry["attempts"] == 1 and entry["status"] == "dead" and entry["retry_count"] == 0
    assert datetime.fromisoformat(entry["first_failed_at"]) == refused_record.first_failed_at
    assert datetime.fromisoformat(entry["last_failed_at"]) == refused_record.last_failed_at
    assert by_message[orphan]["exception_type"] == "ActorNotFound"
    # Newest first, dead ones only.
    times = [datetime.fromisoformat(e["last_failed_at"]) for e in listed]
    assert times == sorted(times, reverse=True)
    assert {e["status"] for e in listed} == {"dead"}

    by_actor = json_output(by_actor_run)
    assert [e["message_id"] for e in by_actor] == [orphan]
    by_queue = json_output(by_queue_run)
    assert {e["queue"] for e in by_queue} <= {"emails"}
    assert not {refused, orphan} & {e["message_id"] for e in by_queue}

    assert table.returncode == 0, describe(table)
    # Its row (with a fresh database, the id may be 1, as the summary line "1 dead letter" starts).
    rows = [row for row in table.stdout.splitlines() if row.split()[:1] == [str(refused_record.id)]]
    assert any("InvalidEmail" in row and payload["contract_id"] in row for row in rows), table.stdout

    shown = json_output(shown_run)
    assert shown["args"] == [payload] and shown["kwargs"] == {}
    assert shown["redis_message_id"] == refused_record.redis_message_id
    assert shown["exception_type"] == "InvalidEmail"
    assert shown["exception_message"] == refused_record.exception_message
    assert "InvalidEmail" in shown["traceback"]

    assert text.returncode == 0, describe(text)
    assert actor in text.stdout and "ActorNotFound" in text.stdout
    # A field without a value reads "-", not Python's None.
    assert "retried_at: -\n" in text.stdout and ": None\n" not in text.stdout, text.stdout
    assert orphan_args[0]["contract_id"] in text.stdout

    assert unknown.returncode == 1, describe(unknown)
    assert json.loads(unknown.stdout) == {
        "id": 10**9,
        "error": {"code": "unknown_dead_letter", "message": f"no dead letter has id {10**9}"},
    }
    assert unknown.stderr == f"unknown_dead_letter: no dead letter has id {10**9}\n"
    ledger.assert_consistent()


def test_retry_all_of_an_actor_and_dying_again_refreshes_the_same_record(
    worker, broker, redis_server, cli_env, ledger
):
    client = redis_server.client()
    actor = missing_actor()
    chosen = [
        ledger.add(enqueue_raw(client, broker.namespace, queue="contracts", actor=actor, args=[{"n": n}]))
        for n in range(2)
    ]
    bystander = ledger.add(
        enqueue_raw(client, broker.namespace, queue="contracts", actor=missing_actor(), args=[{"n": 9}])
    )
    first = {message_id: wait_dead(message_id) for message_id in [*chosen, bystander]}
    ledger.assert_consistent()

    result = json_output(run_cli(cli_env, "dead-letters", "retry", "--all", "--actor", actor, "--json"))
    assert sorted(result["retried"]) == sorted(int(first[m].id or 0) for m in chosen)
    assert result["count"] == 2

    # The actor is still unknown: each message dies again, on the same record.
    for message_id in chosen:
        before = first[message_id]
        again = wait_dead(message_id, newer_than=before.last_failed_at)
        assert again.id == before.id
        assert again.retry_count == 1 and again.retried_at is not None
        assert again.first_failed_at == before.first_failed_at
        assert again.exception_type == "ActorNotFound"
        assert again.attempts == 1
        assert again.redis_message_id not in (None, before.redis_message_id)
        assert redis_copy(client, broker.namespace, "contracts", before.redis_message_id) is None
        assert redis_copy(client, broker.namespace, "contracts", again.redis_message_id) is not None

    untouched = record_of(bystander)
    assert untouched is not None
    assert (untouched.status, untouched.retry_count) == ("dead", 0)
    assert untouched.redis_message_id == first[bystander].redis_message_id
    assert redis_copy(client, broker.namespace, "contracts", untouched.redis_message_id) is not None
    ledger.assert_consistent()


def test_death_during_the_retry_itself_stays_recorded(worker, broker, redis_server, ledger, monkeypatch):
    # A worker can take the re-enqueued message and kill it again before the
    # retry has finished its bookkeeping; hold the retry there until it has.
    client = redis_server.client()
    message_id = ledger.add(
        enqueue_raw(client, broker.namespace, queue="contracts", actor=missing_actor(), args=[{}])
    )
    first = wait_dead(message_id)
    remove_copy = dead_letters._remove_redis_copy

    def remove_copy_then_wait(broker: Any, record: DeadLetter) -> None:
        remove_copy(broker, record)
        wait_dead(record.message_id, newer_than=record.last_failed_at)

    monkeypatch.setattr(dead_letters, "_remove_redis_copy", remove_copy_then_wait)
    assert first.id is not None
    counted: list[int] = []
    assert [r.id for r in dead_letters.retry(broker, [first.id], on_each=counted.append)] == [first.id]
    assert counted == [1]

    final = record_of(message_id)
    assert final is not None
    assert final.status == "dead", "the record says retried although the message is dead again"
    assert final.retry_count == 1
    assert final.redis_message_id not in (None, first.redis_message_id)
    assert redis_copy(client, broker.namespace, "contracts", final.redis_message_id) is not None
    ledger.assert_consistent()


def test_purge_asks_first_and_removes_both_copies(worker, broker, redis_server, cli_env, ledger):
    client = redis_server.client()
    actor = missing_actor()
    kept, purged, old = (
        ledger.add(enqueue_raw(client, broker.namespace, queue="contracts", actor=actor, args=[{"n": n}]))
        for n in range(3)
    )
    records = {message_id: wait_dead(message_id) for message_id in (kept, purged, old)}
    ledger.assert_consistent()

    declined = run_cli(cli_env, "dead-letters", "purge", str(records[purged].id), stdin="n\n")
    assert declined.returncode != 0, describe(declined)
    assert "[y/N]" in declined.stderr and "purged 1" not in declined.stdout
    assert record_of(purged) is not None
    assert redis_copy(client, broker.namespace, "contracts", records[purged].redis_message_id) is not None
    ledger.assert_consistent()

    confirmed = run_cli(cli_env, "dead-letters", "purge", str(records[purged].id), stdin="y\n")
    assert confirmed.returncode == 0, describe(confirmed)
    assert "purged 1" in confirmed.stdout
    assert record_of(purged) is None
    assert redis_copy(client, broker.namespace, "contracts", records[purged].redis_message_id) is None
    ledger.assert_consistent()

    # Far older than anything another test leaves behind.
    long_ago = utc_now() - timedelta(days=400)
    with session_scope() as session:
        session.execute(
            update(DeadLetter)
            .where(col(DeadLetter.id) == records[old].id)
            .values(first_failed_at=long_ago, last_failed_at=long_ago)
        )
    by_age = run_cli(cli_env, "dead-letters", "purge", "--older-than", "365d", "--yes", "--json")
    assert by_age.returncode == 0, describe(by_age)
    assert json_output(by_age)["purged"] >= 1, describe(by_age)
    assert record_of(old) is None
    assert redis_copy(client, broker.namespace, "contracts", records[old].redis_message_id) is None
    survivor = record_of(kept)
    assert survivor is not None and survivor.status == "dead"
    assert redis_copy(client, broker.namespace, "contracts", survivor.redis_message_id) is not None
    ledger.assert_consistent()


def test_retry_and_purge_with_the_broker_down_exit_3_and_change_nothing(
    worker, broker, redis_server, cli_env, ledger
):
    client = redis_server.client()
    message_id = ledger.add(
        enqueue_raw(client, broker.namespace, queue="contracts", actor=missing_actor(), args=[{"n": 1}])
    )
    record = wait_dead(message_id)
    down = {**cli_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    for args in (["retry", str(record.id)], ["purge", str(record.id), "--yes"]):
        result = run_cli(down, "dead-letters", *args)
        assert result.returncode == 3, describe(result)
        # One line: no "showing SQL records only" warning before it, for a command that acts.
        assert result.stderr == "unavailable: the broker cannot be reached (ConnectionError)\n", describe(
            result
        )
        after = record_of(message_id)
        assert after is not None and after.status == "dead" and after.retry_count == 0
    ledger.assert_consistent()
    # Neither an id nor a selection: the command's own usage.
    for args in (["retry"], ["purge"]):
        result = run_cli(cli_env, "dead-letters", *args)
        assert result.returncode == 2, describe(result)
        assert result.stderr.startswith(f"usage: contract-dispatch dead-letters {args[0]} "), describe(result)
        assert "error: give one dead letter ID or --" in result.stderr
    # Ids no record can have are usage errors, not database errors.
    for bad in ("0", "99999999999999999999", "seven"):
        result = run_cli(cli_env, "dead-letters", "show", bad)
        assert result.returncode == 2, describe(result)
        assert "argument ID" in result.stderr and "Traceback" not in result.stderr


def test_a_retry_the_broker_refuses_leaves_the_email_failed_and_a_record_retried_is_not_retried_again(
    worker, broker, standin, redis_server, cli_env, ledger
):
    """Its email was made pending before the enqueue: left so, the sweep's re-drive of lost
    messages would send it behind a dead letter that still reads dead."""
    standin.script(Answer(status=400, body=b'{"errors":[{"message":"The to field is invalid."}]}'))
    payload, delivery, record = invitation_dead(ledger)

    down = {**cli_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = run_cli(down, "dead-letters", "retry", str(record.id))
    assert result.returncode == 3 and "Traceback" not in result.stderr, describe(result)
    (after,) = deliveries_of(payload["contract_id"])
    assert after.status == "failed", "a retry that was not enqueued reopened the email"
    assert after.last_error == delivery.last_error
    stored = record_of(record.message_id)
    assert stored is not None and stored.status == "dead" and stored.retry_count == 0

    result = run_cli(cli_env, "dead-letters", "retry", str(record.id))
    assert result.returncode == 0 and "retried 1" in result.stdout, describe(result)
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the retried email to be sent")
    wait_settled(redis_server.client(), payload["contract_id"])

    # Retried already: nothing to send again, said so (exit 2), not "retried 0".
    for args in ([], ["--json"]):
        again = run_cli(cli_env, "dead-letters", "retry", str(record.id), *args)
        assert again.returncode == 2, describe(again)
        assert again.stderr.startswith("dead_letter_not_retryable: "), describe(again)
        if args:
            assert json.loads(again.stdout)["error"]["code"] == "dead_letter_not_retryable"
    assert len(standin.accepted_for(f"invitation:{payload['contract_id']}:")) == 1
    ledger.assert_consistent()


def test_a_rate_limited_email_that_runs_out_of_retries_is_recorded_as_rate_limited():
    """honour_retry_after turns the provider's 429 into Dramatiq's Retry: the record, the
    email's error and the log line name the 429's own error, not Retry."""
    from models.errors import ProviderRateLimited
    from workers.retry_policy import honour_retry_after

    with pytest.raises(dramatiq.Retry) as raised, honour_retry_after():
        raise ProviderRateLimited("SendGrid answered 429", retry_after_ms=2000)
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="emails", actor_name="deliver_email", args=({"delivery_id": 1},), kwargs={}, options={}
    )
    fields = dead_letters.describe(message, raised.value, now=utc_now())
    assert (fields["exception_type"], fields["exception_message"]) == (
        "ProviderRateLimited",
        "SendGrid answered 429",
    )


# -- the database is down when a message dies ---------------------------------


def _database_down(*args: Any, **kwargs: Any) -> Any:
    raise OperationalError("INSERT INTO dead_letters", {}, ConnectionRefusedError("database is down"))


def _xq_id_of(client: redis.Redis, namespace: str, queue: str, message_id: str) -> str | None:
    _, msgs = xq_keys(namespace, queue)
    for raw_id, raw in client.hgetall(msgs).items():
        if json.loads(raw)["message_id"] == message_id:
            return text_of(raw_id)
    return None


def test_reason_parked_in_redis_while_sql_is_down_is_filed_later(
    worker, broker, redis_server, cli_env, ledger, monkeypatch
):
    client = redis_server.client()
    reasons = f"{broker.namespace}:__dead_letter_reasons__"
    # Only this test files parked reasons, so it sees who filed them.
    monkeypatch.setattr(maintenance, "DEAD_LETTER_SYNC_INTERVAL_MS", 10**12)
    monkeypatch.setattr(dead_letters, "RECORD_PATIENCE_SECONDS", 0.2)

    payload = contract_payload(email="not-an-email")
    with monkeypatch.context() as outage:
        outage.setattr(dead_letters, "record_dead_letter", _database_down)
        message_id = ledger.add(actors.send_contract.send(payload).message_id)
        wait_until(lambda: client.hexists(reasons, message_id), what="the reason to be parked in Redis")
    assert record_of(message_id) is None
    parked = json.loads(client.hget(reasons, message_id))
    assert parked["exception_type"] == "InvalidEmail"
    redis_id = _xq_id_of(client, broker.namespace, "contracts", message_id)
    assert redis_id is not None, "the message itself is in Dramatiq's dead-letter queue"

    # The database is back.
    assert dead_letters.sync(broker, broker.get_declared_queues()) >= 1
    record = record_of(message_id)
    assert record is not None
    assert_reason_kept(
        record, actor="send_contract", queue="contracts", args=[payload], exception_type="InvalidEmail"
    )
    assert record.exception_message == parked["exception_message"]
    assert record.attempts == 1
    assert record.redis_message_id == redis_id
    assert record.first_failed_at <= record.last_failed_at
    assert not client.hexists(reasons, message_id)
    ledger.assert_consistent()

    # Again, and this time the parked reason is lost too: ``list`` still files the message.
    lost_payload = contract_payload(email="still-not-an-email")
    with monkeypatch.context() as outage:
        outage.setattr(dead_letters, "record_dead_letter", _database_down)
        lost = ledger.add(actors.send_contract.send(lost_payload).message_id)
        wait_until(lambda: client.hexists(reasons, lost), what="the second reason to be parked")
    client.hdel(reasons, lost)
    lost_redis_id = _xq_id_of(client, broker.namespace, "contracts", lost)
    assert lost_redis_id is not None

    listed = json_output(run_cli(cli_env, "dead-letters", "list", "--json"))
    (entry,) = [e for e in listed if e["message_id"] == lost]
    assert "reason was lost" in entry["exception_message"]
    assert (entry["actor"], entry["queue"], entry["status"]) == ("send_contract", "contracts", "dead")
    filed = record_of(lost)
    assert filed is not None
    assert filed.message_args == [lost_payload]
    assert filed.redis_message_id == lost_redis_id
    assert filed.contract_id == lost_payload["contract_id"]
    ledger.assert_consistent()


def test_an_email_whose_retries_ran_out_while_sql_was_down_is_failed_when_its_reason_is_filed(
    worker, broker, standin, redis_server, ledger, monkeypatch
):
    """Left pending, the sweep's re-drive of lost messages would send it behind a dead
    letter that reads dead (README: "its delivery marked failed")."""
    client = redis_server.client()
    reasons = f"{broker.namespace}:__dead_letter_reasons__"
    monkeypatch.setattr(maintenance, "DEAD_LETTER_SYNC_INTERVAL_MS", 10**12)
    monkeypatch.setattr(dead_letters, "RECORD_PATIENCE_SECONDS", 0.2)
    tries = get_settings().retry_policy("deliver_email").max_retries + 1
    standin.script(*[Answer(status=500, body=b'{"errors":[{"message":"try later"}]}')] * tries)
    payload = contract_payload()
    with monkeypatch.context() as outage:
        outage.setattr(dead_letters, "record_dead_letter", _database_down)
        send_contract(**payload)
        wait_until(lambda: deliveries_of(payload["contract_id"]), what="the invitation to be recorded")
        (delivery,) = deliveries_of(payload["contract_id"])
        wait_until(
            lambda: _parked_for(client, reasons, delivery.id) is not None, what="the reason to be parked"
        )
    parked_id = _parked_for(client, reasons, delivery.id)
    assert parked_id is not None
    ledger.add(parked_id)
    (still,) = deliveries_of(payload["contract_id"])
    assert still.status == "pending", "the outage did not keep the email from being failed"

    dead_letters.sync(broker, broker.get_declared_queues())
    record = record_of(parked_id)
    assert record is not None and record.exception_type == "ProviderUnavailable"
    (failed,) = deliveries_of(payload["contract_id"])
    assert failed.status == "failed" and failed.last_error is not None and "500" in failed.last_error
    assert len(requests_for(standin, f"invitation:{payload['contract_id']}:")) == tries
    ledger.assert_consistent()


def _parked_for(client: redis.Redis, key: str, delivery_id: int | None) -> str | None:
    """The message id of the parked reason of the deliver_email of ``delivery_id``."""
    for message_id, raw in client.hgetall(key).items():
        fields = json.loads(raw)
        if fields.get("message_args") == [DeliverEmail(delivery_id=delivery_id).to_payload()]:
            return text_of(message_id)
    return None


def test_reason_of_a_worker_killed_between_nack_and_record_is_filed_by_sync(
    worker, broker, redis_server, ledger, monkeypatch
):
    client = redis_server.client()
    holds = f"{broker.namespace}:__dead_letter_holds__"
    monkeypatch.setattr(maintenance, "DEAD_LETTER_SYNC_INTERVAL_MS", 10**12)
    # The worker dies right after Dramatiq's nack: the hook that files the reason never runs.
    monkeypatch.setattr(DeadLetters, "after_nack", lambda self, broker, message: None)

    payload = contract_payload(email="not-an-email")
    message_id = ledger.add(actors.send_contract.send(payload).message_id)
    wait_until(
        lambda: _xq_id_of(client, broker.namespace, "contracts", message_id) is not None,
        what="the message in Dramatiq's dead-letter queue",
    )
    assert record_of(message_id) is None
    assert client.hexists(holds, message_id), "the reason is held from before the nack"

    assert dead_letters.sync(broker, broker.get_declared_queues()) >= 1
    record = record_of(message_id)
    assert record is not None
    assert_reason_kept(
        record, actor="send_contract", queue="contracts", args=[payload], exception_type="InvalidEmail"
    )
    assert record.exception_message == "email: An email address must have an @-sign."
    assert "models.errors.InvalidEmail" in (record.traceback or "")
    assert record.redis_message_id == _xq_id_of(client, broker.namespace, "contracts", message_id)
    assert not client.hexists(holds, message_id)
    ledger.assert_consistent()


def test_held_reason_is_released_once_filed_and_dropped_if_never_nacked(
    worker, broker, redis_server, ledger, monkeypatch
):
    client = redis_server.client()
    holds = f"{broker.namespace}:__dead_letter_holds__"
    monkeypatch.setattr(maintenance, "DEAD_LETTER_SYNC_INTERVAL_MS", 10**12)

    # A worker that lives: the hold is gone once the record is filed.
    message_id = ledger.add(actors.send_contract.send(contract_payload(email="nope")).message_id)
    wait_dead(message_id)
    wait_until(lambda: not client.hexists(holds, message_id), what="the hold to be released")

    # A worker killed after holding the reason and before its nack: the broker
    # delivers the message again, so its hold is dropped after the grace, unfiled.
    ghost = dead_letters.describe(
        dramatiq.Message(
            queue_name="contracts",
            actor_name="send_contract",
            args=(contract_payload(),),
            kwargs={},
            options={},
        ),
        ValueError("never nacked"),
        now=utc_now(),
    )
    dead_letters.hold(broker, ghost)
    dead_letters.sync(broker, broker.get_declared_queues())
    assert client.hexists(holds, ghost["message_id"]), "kept within the grace: its nack may be under way"
    monkeypatch.setattr(dead_letters, "HOLD_GRACE_MS", -1)
    dead_letters.sync(broker, broker.get_declared_queues())
    assert not client.hexists(holds, ghost["message_id"])
    assert record_of(ghost["message_id"]) is None


# -- Redis forgets, SQL does not ----------------------------------------------


def test_redis_dropping_its_copy_leaves_the_sql_record_and_retry_works(
    database, broker, standin, redis_server, test_environment, tmp_path
):
    # A namespace of its own, so the tiny TTL below drops this test's dead letters
    # only; a worker process of its own consumes it.
    namespace = unique("dead-letters")
    env = {**os.environ, **test_environment, "DATABASE_URL": database, "REDIS_NAMESPACE": namespace}
    client = redis_server.client()
    process = WorkerProcess(env, log_path=tmp_path / "worker.log", threads=2).start()
    try:
        workspace = unique("ws")
        payload = contract_payload(workspace_id=workspace)
        message_id = enqueue_raw(client, namespace, queue="contracts", actor="send_contract", args=[payload])
        record = wait_dead(message_id, timeout=SUBPROCESS_TIMEOUT_SECONDS)
        assert record.exception_type == "UnknownWorkspace"
        assert redis_copy(client, namespace, "contracts", record.redis_message_id) is not None

        # Dramatiq's own maintenance, with a TTL short enough that the copy expires.
        expiring: Any = copy.copy(broker)
        expiring.namespace = namespace
        expiring.broker_id = str(uuid.uuid4())
        expiring.dead_message_ttl = 1

        def expired() -> bool:
            run_maintenance(expiring, "contracts")
            return redis_copy(client, namespace, "contracts", record.redis_message_id) is None

        wait_until(expired, what="Dramatiq to drop its dead-letter copy")
        assert not client.hlen(xq_keys(namespace, "contracts")[1])

        listed = json_output(run_cli(env, "dead-letters", "list", "--json"))
        assert [(e["id"], e["status"]) for e in listed if e["message_id"] == message_id] == [
            (record.id, "dead")
        ]
        kept = record_of(message_id)
        assert kept is not None and kept.status == "dead"
        assert (kept.exception_type, kept.exception_message) == (
            record.exception_type,
            record.exception_message,
        )

        # The cause is fixed; the record alone is enough to send the message again.
        set_workspace(workspace, ["rg-1"])
        retried = run_cli(env, "dead-letters", "retry", str(record.id))
        assert retried.returncode == 0, describe(retried)
        assert "retried 1" in retried.stdout, describe(retried)
        wait_for_contract(
            payload["contract_id"],
            lambda r: r.status == "sent" and all_emails_sent(1)(r),
            timeout=SUBPROCESS_TIMEOUT_SECONDS,
            what="the retried contract to be sent",
        )
        after = record_of(message_id)
        assert after is not None and (after.status, after.retry_count) == ("retried", 1)
        assert len(standin.accepted_for(f"invitation:{payload['contract_id']}:")) == 1
    finally:
        process.terminate()
        keys = client.keys(f"{namespace}:*")
        if keys:
            client.delete(*keys)


def test_listing_dead_letters_never_starts_the_embedded_redis(
    test_environment: dict[str, str], tmp_path: Any
) -> None:
    # As status: a command that only reads shows the SQL records and says why it read nothing else.
    data_dir = tmp_path / "data"
    env = {
        **{key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "BROKER_URL")},
        **{key: value for key, value in test_environment.items() if key not in ("REDIS_URL", "BROKER_URL")},
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'dead.db'}",
    }
    get_engine(env["DATABASE_URL"])  # a database to read: the command never creates one
    listed = run_cli(env, "dead-letters", "list", "--json")
    assert listed.returncode == 0, describe(listed)
    assert json.loads(listed.stdout) == []
    warning = "warning: the embedded Redis is not running (a worker starts it), showing SQL records only"
    assert listed.stderr.strip() == warning, describe(listed)
    shown = run_cli(env, "dead-letters", "show", "1")
    assert shown.returncode == 1, describe(shown)
    assert not (data_dir / "redis").exists() or not any((data_dir / "redis").iterdir())
