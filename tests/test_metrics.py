"""Prometheus metrics (issue 5, item 2): the worker's endpoint, ``contract-dispatch metrics``,
the Grafana dashboard and the alert rules.

A real ``contract-dispatch worker`` (two processes) runs with its endpoint on a
free port, in a Redis namespace and a database of its own. It handles contracts
that go through, contracts refused by the binding rule or an unknown resource
group, emails the SendGrid stand-in refuses (400: failed) or answers 503 (retried,
then sent), and a reminder sweep. Both scrapes are parsed with prometheus_client's
own parser, and every figure is compared with what Redis, the database and the
stand-in hold at that moment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import time as clock_time
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func
from sqlmodel import col, select

from contract_dispatch import send_contract
from models.contract import Contract
from models.dead_letter import DeadLetter
from models.delivery import EmailDelivery
from models.reminders import ReminderSweep
from models.types import utc_now
from tests.conftest import database_of_its_own
from tests.processes import WorkerProcess, run_cli
from tests.sendgrid_standin import Answer, Received, SendGridStandIn
from tests.support import contract_payload, free_port, recorded_statements, unique, wait_until
from workers.database import get_engine, session_scope
from workers.ops.exporter import SnapshotCollector
from workers.ops.snapshot import QUEUES, shared_database_figures_key
from workers.settings import reset_settings

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "ops" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana-dashboard.json"

#: A worker subprocess has to boot, and the scenario goes through retries.
SCENARIO_TIMEOUT_SECONDS = 40

#: One command never takes this long.
COMMAND_TIMEOUT_SECONDS = 60

#: Contracts that go through (some of their invitations fail or are retried).
GOOD_CONTRACTS = 6

#: The scenario's reminder window: every day until this local time (the latest it can close).
WINDOW_END = clock_time(23, 59)
REMINDER_TIMEZONE = ZoneInfo("Europe/Paris")

#: A metric name as PromQL and the dashboard write it.
METRIC_NAME = re.compile(r"\b(?:contract_dispatch|dramatiq)_[a-z_]+\b")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers ------------------------------------------------------------------


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels, through the official parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return samples


def series(samples: Samples, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
    """The samples of one name, keyed by the values of ``label_names`` (summed over the other labels)."""
    found: dict[tuple[str, ...], float] = {}
    for (sample_name, labels), value in samples.items():
        if sample_name == name:
            key = tuple(dict(labels)[label] for label in label_names)
            found[key] = found.get(key, 0.0) + value
    return found


def exported_dead(counted: dict[str, int]) -> dict[tuple[str, ...], float]:
    """``contract_dispatch_dead_letters`` for these SQL counts: every known actor, 0 if absent."""
    from workers.ops.exporter import DEAD_LETTER_ACTORS

    exported: dict[tuple[str, ...], float] = {(actor,): 0.0 for actor in DEAD_LETTER_ACTORS}
    exported.update(((actor,), float(n)) for actor, n in counted.items())
    return exported


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    )


def http_scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        return str(answer.read().decode("utf-8"))


def try_scrape(port: int) -> str | None:
    try:
        return http_scrape(port)
    except OSError:
        return None


def enqueue_raw(
    client: redis.Redis,
    namespace: str,
    *,
    queue: str,
    actor: str,
    payload: dict[str, Any],
    eta_ms: int | None = None,
    timestamp_ms: int | None = None,
) -> str:
    """Enqueue as a producer without Python does; with ``eta_ms``, on the queue's delay queue."""
    message_id = str(uuid.uuid4())
    queue_name = f"{queue}.DQ" if eta_ms is not None else queue
    options: dict[str, Any] = {"redis_message_id": message_id}
    if eta_ms is not None:
        options["eta"] = eta_ms
    message = {
        "queue_name": queue_name,
        "actor_name": actor,
        "args": [payload],
        "kwargs": {},
        "options": options,
        "message_id": message_id,
        "message_timestamp": timestamp_ms if timestamp_ms is not None else int(time.time() * 1000),
    }
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{namespace}:{queue_name}.msgs", message_id, json.dumps(message))
        pipe.rpush(f"{namespace}:{queue_name}", message_id)
        pipe.execute()
    return message_id


def raw_queue_figures(client: redis.Redis, namespace: str) -> dict[tuple[str, str], float]:
    """Queue depth per (queue, state) read straight from Dramatiq's Redis keys."""
    figures: dict[tuple[str, str], float] = {}
    ack_keys = [key.decode() for key in client.keys(f"{namespace}:__acks__.*")]  # type: ignore[union-attr]
    for queue in QUEUES:
        figures[(queue, "ready")] = client.llen(f"{namespace}:{queue}")
        figures[(queue, "delayed")] = client.hlen(f"{namespace}:{queue}.DQ.msgs")
        figures[(queue, "in_flight")] = sum(
            client.scard(key) for key in ack_keys if key.endswith(f".{queue}")
        )
        figures[(queue, "dead")] = client.zcard(f"{namespace}:{queue}.XQ")
    return figures


def sql_figures() -> dict[str, Any]:
    """What the database holds: emails by kind and status, refusals, dead letters, contracts."""
    with session_scope() as session:
        emails = {
            (kind, status): count
            for kind, status, count in session.exec(
                select(EmailDelivery.kind, EmailDelivery.status, func.count()).group_by(
                    EmailDelivery.kind, EmailDelivery.status
                )
            )
        }
        refusals = {
            code: count
            for code, count in session.exec(
                select(Contract.error_code, func.count())
                .where(Contract.status == "rejected")
                .group_by(Contract.error_code)
            )
        }
        dead = {
            actor: count
            for actor, count in session.exec(
                select(DeadLetter.actor_name, func.count())
                .where(DeadLetter.status == "dead")
                .group_by(DeadLetter.actor_name)
            )
        }
        contracts = {
            status: count
            for status, count in session.exec(select(Contract.status, func.count()).group_by(Contract.status))
        }
        sweeps = list(session.exec(select(ReminderSweep)).all())
    return {"emails": emails, "refusals": refusals, "dead": dead, "contracts": contracts, "sweeps": sweeps}


def write_metric_files(directory: Path, code: str) -> None:
    """Run ``code`` in a process of its own writing to ``directory`` in multiprocess mode; it then exits."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    script = "import prometheus_client as p\nregistry = p.CollectorRegistry()\n" + code
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=COMMAND_TIMEOUT_SECONDS)


#: A file a dead process left: 1,000 processed messages no current worker did.
STALE_COUNTER = (
    "c = p.Counter('dramatiq_messages_total', 'x', ['queue_name', 'actor_name'], registry=registry)\n"
    "c.labels('contracts', 'send_contract').inc(1000)\n"
)

#: A process killed while it had 7 messages in progress (Dramatiq's live-summed gauge).
KILLED_IN_PROGRESS = (
    "g = p.Gauge('dramatiq_messages_inprogress', 'x', ['queue_name', 'actor_name'], registry=registry,"
    " multiprocess_mode='livesum')\n"
    "g.labels('emails', 'deliver_email').inc(7)\n"
)


# -- the scenario ---------------------------------------------------------------


@dataclass
class Run:
    """One worker run and what the test can compare its scrapes with."""

    env: dict[str, str]
    namespace: str
    client: redis.Redis
    port: int
    metrics_dir: Path
    contract_ids: list[str]
    requests: list[Received]
    http: Samples
    http_raw: dict[tuple[str, str], float]
    http_sql: dict[str, Any]
    #: This run's own dead letters in SQL by actor (the table may hold others': see ``dead_ids_of``).
    http_own_dead: dict[str, int]
    worker_pids: list[int]
    #: The pids in METRICS_DIR's file names at the endpoint's scrape.
    file_pids: set[int]
    #: ``contract-dispatch metrics`` once the worker stopped, with Redis and SQL read then.
    cli: subprocess.CompletedProcess[str]
    cli_raw: dict[tuple[str, str], float]
    #: SQL read just before and just after the command (see ``dead_ids_of`` for why both).
    cli_sql_around: tuple[dict[str, Any], dict[str, Any]]
    #: Ready messages enqueued for the command's scrape, and how long ago they were made (seconds).
    waiting_since_seconds: float
    cli_seconds: float


@pytest.fixture(scope="module")
def own_database(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database of the same kind as ``database``: the gauges describe the whole of it."""
    with database_of_its_own(database, tmp_path_factory.mktemp("metrics") / "metrics.db") as url:
        yield url


def worker_processes(worker: WorkerProcess) -> list[int]:
    """Dramatiq's worker processes under the supervisor (not the metrics endpoint)."""
    pids = []
    for pid in worker.children():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"workers.ops.exporter" not in command:
            pids.append(pid)
    return pids


def file_pids(directory: Path) -> set[int]:
    return {int(m[1]) for m in (re.search(r"_(\d+)\.db$", p.name) for p in directory.iterdir()) if m}


#: How long the ready messages of the command's scrape have waited, in seconds.
WAITING_SECONDS = 120


def mine(standin: SendGridStandIn, contract_ids: list[str]) -> list[Received]:
    """The stand-in's requests for this run's contracts (references carry the contract id)."""
    return [
        r for r in list(standin.requests) if any(f":{cid}:" in (r.reference or "") for cid in contract_ids)
    ]


def dead_ids_of(client: redis.Redis, namespace: str) -> list[str]:
    """The Redis ids of the messages dead in ``namespace`` (this run's).

    The SQL table may also hold records of other namespaces' dead messages: the
    tests' in-process worker files its own namespace's into whichever database
    the settings name now (its maintenance runs every minute, whenever that falls).
    """
    return [
        bytes(member).decode()
        for queue in QUEUES
        for member in cast(list[bytes], client.zrange(f"{namespace}:{queue}.XQ", 0, -1))
    ]


def dead_letters_of(dead_ids: list[str]) -> dict[str, int]:
    """The SQL dead-letter records of these messages, counted by actor."""
    with session_scope() as session:
        return {
            actor: count
            for actor, count in session.exec(
                select(DeadLetter.actor_name, func.count())
                .where(col(DeadLetter.redis_message_id).in_(dead_ids), DeadLetter.status == "dead")
                .group_by(DeadLetter.actor_name)
            )
        }


def settled(client: redis.Redis, namespace: str, contract_ids: list[str], standin: SendGridStandIn) -> bool:
    """Nothing left to do: contracts decided, emails decided, queues empty, dead letters filed."""
    raw = raw_queue_figures(client, namespace)
    if any(raw[(queue, state)] for queue in QUEUES for state in ("ready", "in_flight", "delayed")):
        return False
    if standin.in_flight:
        return False
    figures = sql_figures()
    dead_ids = dead_ids_of(client, namespace)
    with session_scope() as session:
        undecided = session.exec(
            select(func.count()).where(col(Contract.id).in_(contract_ids), Contract.status == "queued")
        ).one()
        pending = session.exec(select(func.count()).where(EmailDelivery.status == "pending")).one()
        recorded = session.exec(
            select(func.count()).where(
                col(DeadLetter.redis_message_id).in_(dead_ids), DeadLetter.status == "dead"
            )
        ).one()
    filed = recorded == len(dead_ids)
    sweeps_done = all(sweep.finished_at is not None for sweep in figures["sweeps"])
    return undecided == 0 and pending == 0 and filed and sweeps_done


@pytest.fixture(scope="module")
def run(
    own_database: str,
    test_environment: dict[str, str],
    standin_server: SendGridStandIn,
    redis_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Run]:
    directory = tmp_path_factory.mktemp("metrics-run")
    namespace = unique("metrics")
    port = free_port()
    metrics_dir = directory / "metric-files"
    env = {
        **os.environ,
        **test_environment,
        "DATABASE_URL": own_database,
        "REDIS_NAMESPACE": namespace,
        "METRICS_PORT": str(port),
        "METRICS_DIR": str(metrics_dir),
        # The gauges are compared with the database as read just before the scrape: none
        # of the scrapes while it settled may serve them (see the shared-reading test).
        "METRICS_DATABASE_MAX_AGE_MS": "0",
        # Every hour of every day, so the sweep below reminds instead of postponing.
        "REMINDER_WINDOW_DAYS": "mon-sun",
        "REMINDER_WINDOW_START": "00:00",
        "REMINDER_WINDOW_END": WINDOW_END.isoformat("minutes"),
        "REMINDER_TIMEZONE": REMINDER_TIMEZONE.key,
    }
    client: redis.Redis = redis_server.client()
    metrics_dir.mkdir()
    write_metric_files(metrics_dir, STALE_COUNTER)

    standin_server.reset()
    # The first four provider calls: two refused for good, two unavailable (retried).
    standin_server.script(Answer(status=400), Answer(status=400), Answer(status=503), Answer(status=503))
    worker = WorkerProcess(env, log_path=directory / "worker.log", processes=2, threads=2).start()
    try:
        wait_until(lambda: try_scrape(port), timeout=SCENARIO_TIMEOUT_SECONDS, what="the metrics endpoint")
        good = [contract_payload() for _ in range(GOOD_CONTRACTS)]
        unknown_group = contract_payload(resource_group_id="nowhere")
        batch = [*good, unknown_group]
        for payload in batch:
            enqueue_raw(client, namespace, queue="contracts", actor="send_contract", payload=payload)
        contract_ids = [payload["contract_id"] for payload in batch]

        def wait_settled() -> None:
            wait_until(
                lambda: settled(client, namespace, contract_ids, standin_server),
                timeout=SCENARIO_TIMEOUT_SECONDS,
                what=f"the worker to settle (log: {directory / 'worker.log'})",
            )

        wait_settled()
        # The first contract bound its email to its company: the same letters in capitals are refused.
        bound = contract_payload(email=good[0]["email"], company_name=good[0]["company_name"].upper())
        enqueue_raw(client, namespace, queue="contracts", actor="send_contract", payload=bound)
        contract_ids.append(bound["contract_id"])
        # A sweep as if four days had passed: the invitations sent are due a reminder.
        four_days_on = utc_now() + timedelta(days=4)
        if four_days_on.astimezone(REMINDER_TIMEZONE).time() >= WINDOW_END:
            # The window's last minute is outside it (it ends at 23:59): a sweep
            # there would postpone the reminders, so it runs at the next opening.
            four_days_on += timedelta(minutes=2)
        as_of = four_days_on.isoformat()
        enqueue_raw(client, namespace, queue="maintenance", actor="sweep_reminders", payload={"as_of": as_of})
        wait_settled()
        # A retry waiting an hour: held by the worker, counted as delayed.
        eta = int((time.time() + 3600) * 1000)
        enqueue_raw(
            client, namespace, queue="emails", actor="deliver_email", payload={"delivery_id": 0}, eta_ms=eta
        )
        wait_until(
            lambda: total(parse(http_scrape(port)), "dramatiq_delayed_messages_inprogress") >= 1,
            what="the worker to hold the retry due in an hour",
        )
        # A process killed with messages in progress left its live gauge behind.
        write_metric_files(metrics_dir, KILLED_IN_PROGRESS)

        requests = mine(standin_server, contract_ids)
        raw = raw_queue_figures(client, namespace)
        sql = sql_figures()
        own_dead = dead_letters_of(dead_ids_of(client, namespace))
        http = parse(http_scrape(port))
        worker_pids = worker_processes(worker)
        pids_in_files = file_pids(metrics_dir)

        # The worker stops; its counters stay in METRICS_DIR for the command to read.
        assert worker.terminate() == 0, worker.log()
        wait_until(lambda: try_scrape(port) is None, what="the endpoint to stop with the worker")
        waiting_since = time.time() - WAITING_SECONDS
        for _ in range(2):
            enqueue_raw(
                client,
                namespace,
                queue="contracts",
                actor="send_contract",
                payload=contract_payload(),
                timestamp_ms=int(waiting_since * 1000),
            )
        sql_before = sql_figures()
        started = time.time()
        cli = run_cli(env, "metrics")
        cli_seconds = time.time() - started
        cli_raw = raw_queue_figures(client, namespace)
        sql_after = sql_figures()
        yield Run(
            env=env,
            namespace=namespace,
            client=client,
            port=port,
            metrics_dir=metrics_dir,
            contract_ids=contract_ids,
            requests=requests,
            http=http,
            http_raw=raw,
            http_sql=sql,
            http_own_dead=own_dead,
            worker_pids=worker_pids,
            file_pids=pids_in_files,
            cli=cli,
            cli_raw=cli_raw,
            cli_sql_around=(sql_before, sql_after),
            waiting_since_seconds=started - waiting_since,
            cli_seconds=cli_seconds,
        )
    finally:
        if worker.alive():
            worker.terminate()
        standin_server.reset()
        keys = client.keys(f"{namespace}:*")
        if keys:
            client.delete(*keys)
        client.close()


# -- the endpoint ---------------------------------------------------------------


def test_endpoint_counts_emails_refusals_and_reminders_as_the_database_records_them(run):
    sql = run.http_sql
    emails = series(run.http, "contract_dispatch_emails_total", "kind", "outcome")
    for (kind, status), count in sql["emails"].items():
        assert emails.get((kind, status), 0) == count, (kind, status, emails, sql["emails"])
    for (kind, outcome), value in emails.items():
        if outcome in ("sent", "failed", "cancelled"):
            assert value == sql["emails"].get((kind, outcome), 0), (kind, outcome, emails)
    # The scenario went where it was meant to: both refusals, both provider failures, reminders.
    assert emails[("invitation", "failed")] == 2
    assert emails[("invitation", "sent")] == GOOD_CONTRACTS - 2
    assert emails.get(("reminder", "sent"), 0) >= 1
    # An email answered 503 stayed pending and was retried: one count per such answer.
    unavailable = sum(1 for request in run.requests if request.status == 503)
    assert unavailable == 2
    assert sum(v for (_, outcome), v in emails.items() if outcome == "retried") == unavailable

    refusals = series(run.http, "contract_dispatch_rejections_total", "actor", "code")
    assert refusals == {("send_contract", code): float(n) for code, n in sql["refusals"].items()}
    assert set(sql["refusals"]) == {"email_bound_to_other_company", "unknown_resource_group"}

    reminders = series(run.http, "contract_dispatch_reminders_total", "outcome")
    reminder_rows = sum(n for (kind, _), n in sql["emails"].items() if kind == "reminder")
    assert reminders.get(("enqueued",), 0) == reminder_rows >= 1
    assert series(run.http, "contract_dispatch_reminder_sweeps_total", "outcome") == {("done",): 1.0}
    (sweep,) = sql["sweeps"]
    assert total(run.http, "contract_dispatch_last_reminder_sweep_timestamp_seconds") == pytest.approx(
        sweep.started_at.timestamp()
    )


def test_provider_histogram_counts_every_call_the_provider_received(run):
    calls = series(run.http, "contract_dispatch_provider_send_duration_seconds_count", "backend", "outcome")
    by_status = Counter(request.status for request in run.requests)
    assert calls == {
        ("sendgrid", outcome): float(n)
        for outcome, n in (
            ("accepted", by_status[202]),
            ("rejected", by_status[400]),
            ("unavailable", by_status[503]),
        )
        if n
    }
    assert sum(calls.values()) == len(run.requests)
    # The +Inf bucket holds every call; sums are durations in seconds, short ones here.
    infinite = total(run.http, "contract_dispatch_provider_send_duration_seconds_bucket", le="+Inf")
    assert infinite == len(run.requests)
    assert 0 < total(run.http, "contract_dispatch_provider_send_duration_seconds_sum") < len(run.requests) * 2


def test_queue_and_dead_letter_gauges_equal_redis_and_sql(run):
    depth = series(run.http, "contract_dispatch_queue_messages", "queue", "state")
    assert depth == {key: float(value) for key, value in run.http_raw.items()}
    assert depth[("emails", "delayed")] == 1
    assert depth[("contracts", "dead")] == 2
    assert depth[("emails", "dead")] == 2
    dead = series(run.http, "contract_dispatch_dead_letters", "actor")
    # The gauge counts the whole table; this run's own records are among them.
    assert dead == exported_dead(run.http_sql["dead"])
    # Every actor has its series, at 0 without dead letters: an alert sees its first ones.
    assert dead[("notify_signatories",)] == dead[("expire_access_codes",)] == dead[("(malformed)",)] == 0
    assert run.http_own_dead == {"send_contract": 2, "deliver_email": 2}
    contracts = series(run.http, "contract_dispatch_contracts", "status")
    assert contracts == {(status,): float(n) for status, n in run.http_sql["contracts"].items()}
    ages = series(run.http, "contract_dispatch_queue_oldest_ready_age_seconds", "queue")
    assert ages == {(queue,): 0.0 for queue in QUEUES}
    assert total(run.http, "contract_dispatch_live_workers") == len(run.worker_pids) == 2
    assert series(run.http, "contract_dispatch_snapshot_source_up", "source") == {
        ("broker",): 1.0,
        ("database",): 1.0,
    }


def test_dramatiq_figures_are_summed_over_the_worker_processes_and_start_from_zero(run):
    processed = series(run.http, "dramatiq_messages_total", "actor_name")
    # Contracts: the batch and the refused one. Every provider call is one deliver_email
    # message but the invitations' first attempts, made by send_contract; each
    # invitation refused there (400) has its dead letter filed by a deliver_email
    # message that calls no provider.
    assert processed[("send_contract",)] == GOOD_CONTRACTS + 2
    refused = sum(1 for request in run.requests if request.status == 400)
    assert refused == 2
    assert processed[("deliver_email",)] == len(run.requests) - GOOD_CONTRACTS + refused
    assert processed[("sweep_reminders",)] == 1
    # The stale file of a previous run (1,000 messages) was cleared when the worker started.
    assert sum(processed.values()) < 1000
    dead_lettered = series(run.http, "dramatiq_message_rejects_total", "actor_name")
    assert dead_lettered == {("send_contract",): 2.0, ("deliver_email",): 2.0}
    assert total(run.http, "dramatiq_message_retries_total") == 2
    # The killed process's 7 in-progress messages are forgotten; nothing is in progress.
    assert total(run.http, "dramatiq_messages_inprogress") == 0
    # Held: the retry due in an hour, under its queue's name. The retries moved when
    # due are held no longer, whichever process took them.
    delayed = series(run.http, "dramatiq_delayed_messages_inprogress", "queue_name")
    assert {labels: value for labels, value in delayed.items() if value} == {("emails",): 1.0}
    # Files come from the two worker processes only, one set each.
    assert run.file_pids == set(run.worker_pids)


# -- one database reading for the fleet's endpoints -----------------------------------


def contracts_gauge(endpoint: SnapshotCollector) -> tuple[dict[str, float], list[str]]:
    """One scrape of ``endpoint``'s gauges: contracts per status, and the SQL it ran."""
    with recorded_statements() as seen:
        families = list(endpoint.collect())
    (contracts,) = [family for family in families if family.name == "contract_dispatch_contracts"]
    up = {
        sample.labels["source"]: sample.value
        for family in families
        for sample in family.samples
        if family.name == "contract_dispatch_snapshot_source_up"
    }
    assert up == {"broker": 1.0, "database": 1.0}, up
    return {sample.labels["status"]: sample.value for sample in contracts.samples}, [
        sent.statement for sent in seen
    ]


def test_endpoints_share_one_database_reading_within_its_max_age(database, redis_server, monkeypatch):
    """N endpoints scraped every interval read the whole-system gauges about once, not N times."""
    import contract_dispatch.producer as producer

    # Nothing to enqueue: the contracts only have to be in the database.
    monkeypatch.setattr(producer, "_enqueue", lambda message: None)
    namespace = unique("shared-figures")
    monkeypatch.setenv("REDIS_NAMESPACE", namespace)
    monkeypatch.setenv("METRICS_DATABASE_MAX_AGE_MS", "60000")
    reset_settings()
    client = redis_server.client()
    key = shared_database_figures_key(namespace)
    # Two endpoints: what one reads reaches the other through Redis only.
    first, second = SnapshotCollector(), SnapshotCollector()
    try:
        before, statements = contracts_gauge(first)
        assert any("FROM contracts" in statement for statement in statements), statements
        # For the max age set above (a few milliseconds of it spent since).
        assert 55000 < client.pttl(key) <= 60000
        send_contract(**contract_payload())

        # Within the max age the other endpoint reads nothing from the database.
        shared, statements = contracts_gauge(second)
        assert statements == []
        assert shared == before

        # Once it has expired, the next scrape reads the database (the new contract) and leaves that.
        client.delete(key)
        after, statements = contracts_gauge(second)
        assert any("FROM contracts" in statement for statement in statements), statements
        assert after.get("queued", 0) == before.get("queued", 0) + 1
        assert contracts_gauge(first) == (after, [])

        # Something other than figures under the key: read the database.
        client.set(key, "not json", px=60000)
        assert contracts_gauge(first)[1] != []

        # 0: every scrape reads the database, and leaves nothing for the others.
        monkeypatch.setenv("METRICS_DATABASE_MAX_AGE_MS", "0")
        reset_settings()
        client.delete(key)
        for endpoint in (first, second):
            assert contracts_gauge(endpoint)[1] != []
        assert client.exists(key) == 0
    finally:
        client.delete(key)
        client.close()
        monkeypatch.undo()
        reset_settings()


# -- the command ------------------------------------------------------------------


def test_metrics_command_prints_one_scrape_with_the_workers_counters(run):
    """After the worker stopped: its counters stay readable, and the gauges are read now."""
    assert run.cli.returncode == 0, run.cli.stderr
    cli = parse(run.cli.stdout)
    assert series(cli, "contract_dispatch_queue_messages", "queue", "state") == {
        key: float(value) for key, value in run.cli_raw.items()
    }
    assert run.cli_raw[("contracts", "ready")] == 2
    ages = series(cli, "contract_dispatch_queue_oldest_ready_age_seconds", "queue")
    assert (
        run.waiting_since_seconds - 1
        <= ages[("contracts",)]
        <= run.waiting_since_seconds + run.cli_seconds + 1
    )
    assert ages[("emails",)] == ages[("maintenance",)] == 0
    assert total(cli, "contract_dispatch_live_workers") == 0
    dead = series(cli, "contract_dispatch_dead_letters", "actor")
    # The whole table as the command read it: the in-process test worker may file
    # other namespaces' dead letters into it meanwhile, at most once a minute.
    assert any(dead == exported_dead(sql["dead"]) for sql in run.cli_sql_around), (dead, run.cli_sql_around)
    # The counters are the worker's files, unchanged since the endpoint's scrape.
    for name in (
        "contract_dispatch_emails_total",
        "contract_dispatch_rejections_total",
        "contract_dispatch_reminders_total",
        "contract_dispatch_provider_send_duration_seconds_count",
        "dramatiq_messages_total",
        "dramatiq_message_rejects_total",
    ):
        from_cli = {key: value for key, value in cli.items() if key[0] == name}
        assert from_cli == {key: value for key, value in run.http.items() if key[0] == name}, name
        assert from_cli, name
    # A stopped worker marked its processes dead: nothing in progress.
    assert total(cli, "dramatiq_messages_inprogress") == 0


# -- dashboard and alert rules ------------------------------------------------------


def scraped_names(samples: Samples) -> set[str]:
    """Metric names a query can use: sample names (``_bucket``, ``_count``...) and family names."""
    names = {name for name, _ in samples}
    for name in list(names):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix):
                names.add(name.removesuffix(suffix))
    return names


def test_alert_rules_parse_have_runbooks_and_name_real_metrics(run):
    rules_file = yaml.safe_load(ALERTS.read_text())
    (group,) = rules_file["groups"]
    rules = group["rules"]
    alerts = {rule["alert"]: rule for rule in rules}
    assert len(alerts) == len(rules) >= 5
    exported = scraped_names(run.http)
    expressions = []
    for name, rule in alerts.items():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        runbook = rule["annotations"]["runbook"]
        assert isinstance(runbook, str) and runbook.strip() and "\n" not in runbook.strip(), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        used = set(METRIC_NAME.findall(rule["expr"]))
        assert used, f"{name} uses no service metric"
        assert used <= exported, f"{name} uses metrics no scrape has: {sorted(used - exported)}"
        expressions.append(rule["expr"])
    # The five conditions are all watched.
    joined = " ".join(expressions)
    for needed in (
        'contract_dispatch_queue_messages{state="ready"}',
        "contract_dispatch_queue_oldest_ready_age_seconds",
        "contract_dispatch_dead_letters",
        "contract_dispatch_live_workers",
        "contract_dispatch_provider_send_duration_seconds_count",
    ):
        assert needed in joined, needed


def test_dashboard_is_importable_and_queries_real_metrics(run):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 30
    assert any(entry["pluginId"] == "prometheus" for entry in dashboard["__inputs"])
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    exported = scraped_names(run.http)
    queried: set[str] = set()
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(METRIC_NAME.findall(target["expr"]))
            assert used, f"panel {panel['title']!r} queries no service metric"
            assert used <= exported, f"panel {panel['title']!r}: {sorted(used - exported)} not in a scrape"
            queried |= used
    # Every figure the issue asks for has a panel.
    for needed in (
        "contract_dispatch_queue_messages",
        "contract_dispatch_dead_letters",
        "contract_dispatch_queue_oldest_ready_age_seconds",
        "contract_dispatch_emails_total",
        "contract_dispatch_rejections_total",
        "contract_dispatch_provider_send_duration_seconds_bucket",
        "contract_dispatch_reminders_total",
        "dramatiq_messages_total",
    ):
        assert needed in queried, needed


# -- two workers on one host ----------------------------------------------------------


def test_two_workers_on_one_host_count_only_their_own_processes(test_environment, redis_server, tmp_path):
    """One sets METRICS_DIR, the other takes the default (one directory per METRICS_PORT)."""
    namespace = unique("metrics-two")
    port_a, port_b = free_port(), free_port()
    base = {
        **os.environ,
        **test_environment,
        # A database of its own: these messages die, and their dead letters are no other test's.
        "DATABASE_URL": f"sqlite:///{tmp_path / 'two.db'}",
        "REDIS_NAMESPACE": namespace,
    }
    base.pop("METRICS_DIR", None)
    env_a = {**base, "METRICS_PORT": str(port_a), "METRICS_DIR": str(tmp_path / "metrics-a")}
    env_b = {**base, "METRICS_PORT": str(port_b)}
    dir_b = Path(test_environment["DATA_DIR"]).resolve() / "metrics" / str(port_b)
    client: redis.Redis = redis_server.client()
    workers = [
        WorkerProcess(env, log_path=tmp_path / f"{name}.log", processes=1, threads=2).start()
        for name, env in (("a", env_a), ("b", env_b))
    ]
    try:
        for port in (port_a, port_b):
            wait_until(partial(try_scrape, port), timeout=SCENARIO_TIMEOUT_SECONDS, what="an endpoint")
        messages = 12
        for _ in range(messages):
            # Not a valid payload: refused at once (invalid_payload), whichever worker takes it.
            enqueue_raw(client, namespace, queue="contracts", actor="send_contract", payload={})

        def scrapes() -> list[Samples]:
            found = [parse(http_scrape(port)) for port in (port_a, port_b)]
            done = sum(total(s, "dramatiq_messages_total") for s in found) == messages
            # A worker's endpoint answers before its process's first heartbeat: on a
            # loaded machine one worker can take every message before the other beats.
            both_live = all(total(s, "contract_dispatch_live_workers") == 2 for s in found)
            return found if done and both_live else []

        a, b = wait_until(
            scrapes, timeout=SCENARIO_TIMEOUT_SECONDS, what="every message counted once, both workers live"
        )
        for samples, worker, directory in ((a, workers[0], tmp_path / "metrics-a"), (b, workers[1], dir_b)):
            # Each endpoint sums its own worker's processes, and only them.
            assert file_pids(directory) <= set(worker_processes(worker)), directory
            assert total(samples, "contract_dispatch_rejections_total", code="invalid_payload") == total(
                samples, "dramatiq_messages_total"
            )
            # The gauges describe the whole system: both workers are live.
            assert total(samples, "contract_dispatch_live_workers") == 2
        assert file_pids(tmp_path / "metrics-a").isdisjoint(file_pids(dir_b))
        # The command finds worker B's files from the same settings.
        result = run_cli(env_b, "metrics")
        assert result.returncode == 0, result.stderr
        assert total(parse(result.stdout), "dramatiq_messages_total") == total(b, "dramatiq_messages_total")
    finally:
        for worker in workers:
            if worker.alive():
                worker.terminate()
        keys = client.keys(f"{namespace}:*")
        if keys:
            client.delete(*keys)
        client.close()


def test_a_worker_started_on_a_running_workers_port_keeps_its_counts_and_takes_the_endpoint_over(
    test_environment, redis_server, tmp_path
):
    """A restart that overlaps the old worker's exit (or a second worker on the same
    METRICS_PORT): the old worker's live metric files are kept, and the new endpoint
    starts once the port is free."""
    namespace = unique("metrics-overlap")
    port = free_port()
    env = {
        **os.environ,
        **test_environment,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'overlap.db'}",
        "REDIS_NAMESPACE": namespace,
        "METRICS_PORT": str(port),
        "METRICS_DIR": str(tmp_path / "metric-files"),
    }
    client: redis.Redis = redis_server.client()

    def counted(expected: int) -> bool:
        scraped = try_scrape(port)
        return scraped is not None and total(parse(scraped), "dramatiq_messages_total") == expected

    def refused(amount: int) -> None:
        for _ in range(amount):
            # Not a valid payload: refused at once (invalid_payload), whichever worker takes it.
            enqueue_raw(client, namespace, queue="contracts", actor="send_contract", payload={})

    old = WorkerProcess(env, log_path=tmp_path / "old.log", processes=1, threads=2).start()
    new: WorkerProcess | None = None
    try:
        wait_until(lambda: try_scrape(port), timeout=SCENARIO_TIMEOUT_SECONDS, what="the old endpoint")
        refused(5)
        wait_until(lambda: counted(5), timeout=SCENARIO_TIMEOUT_SECONDS, what="the old worker's counts")
        started = new = WorkerProcess(env, log_path=tmp_path / "new.log", processes=1, threads=2).start()
        wait_until(
            # Its metric files were prepared before its processes started.
            lambda: worker_processes(started),
            timeout=SCENARIO_TIMEOUT_SECONDS,
            what="the new worker to start beside the old one",
        )
        refused(7)
        # The old worker's counts survive the new one's start, summed with the new ones.
        wait_until(lambda: counted(12), timeout=SCENARIO_TIMEOUT_SECONDS, what="both workers' counts")
        assert "kept, and summed with this worker's" in started.log()
        assert old.terminate() == 0
        # The new worker's endpoint takes the port over; what the old one did still counts.
        wait_until(lambda: counted(12), timeout=SCENARIO_TIMEOUT_SECONDS, what="the new worker's endpoint")
        assert "Metrics endpoint on http" in started.log()
    finally:
        for worker in (old, new):
            if worker is not None and worker.alive():
                worker.terminate()
        keys = client.keys(f"{namespace}:*")
        if keys:
            client.delete(*keys)
        client.close()


def test_metrics_command_still_prints_what_it_can_read_when_redis_is_down(test_environment, tmp_path):
    env = {
        **os.environ,
        **test_environment,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'down.db'}",
        # Nothing listens there: connection refused at once.
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "REDIS_OUTAGE_PATIENCE_SECONDS": "0",
        "METRICS_DIR": str(tmp_path / "no-worker-ran-here"),
    }
    get_engine(env["DATABASE_URL"])  # metrics read a database; they never create one
    result = run_cli(env, "metrics")
    assert result.returncode == 3, result.stderr
    assert "unavailable: broker" in result.stderr
    samples = parse(result.stdout)
    assert series(samples, "contract_dispatch_snapshot_source_up", "source") == {
        ("broker",): 0.0,
        ("database",): 1.0,
    }
    # No figure is made up for the part it could not read.
    assert not series(samples, "contract_dispatch_queue_messages", "queue", "state")
    assert not series(samples, "contract_dispatch_live_workers")
    assert series(samples, "contract_dispatch_contracts", "status") == {}


def test_worker_start_clears_only_metric_files(tmp_path):
    from workers.ops.exporter import prepare_metrics_dir

    write_metric_files(tmp_path, STALE_COUNTER + KILLED_IN_PROGRESS)
    left = sorted(path.name for path in tmp_path.iterdir())
    assert len(left) == 2 and all(name.endswith(".db") for name in left), left
    # A directory set by mistake to one that holds other files (the SQLite database).
    (tmp_path / "contract-dispatch.db").write_bytes(b"SQLite format 3\x00")
    prepare_metrics_dir(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["contract-dispatch.db"]
