"""``contract-dispatch status`` against a running system (issue 5, item 1).

One system per database (SQLite, PostgreSQL) is brought into known states by
real worker processes: contracts sent, signed, cancelled, rejected and still
queued; emails sent, failed (a 400) and waiting for a retry (a 503, retried
much later); a poisoned message and a refusal dead-lettered; a reminder sweep;
one worker blocked on the provider while holding messages and one worker
SIGKILLed while holding messages; messages left ready because no worker can
take more. Then every figure ``status --json`` prints (through the real CLI) is
compared with what Redis (``LLEN``, ``HLEN``, ``SCARD``, ``ZCARD``, ``ZRANGE``)
and the database hold at that moment, and with the states the test made.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import _postgres_schema_url
from tests.processes import CLI
from tests.status_system import (
    MAINTENANCE_MS,
    QUEUES,
    STATUS_HEARTBEAT_TIMEOUT_MS,
    System,
    open_system,
    settle,
    text,
)
from tests.support import RedisServer, free_port
from workers.database import get_engine
from workers.ops.snapshot import Snapshot, WorkerFigures

#: Messages a worker takes from each queue beyond the one it processes: none, so
#: that which worker holds what is known.
PREFETCH = "1"

#: Tests of the command's mechanics (table, watch, exit codes) need one database, not both.
ONE_DATABASE = pytest.mark.parametrize("system", ["sqlite"], indirect=True)

#: The reminder sweep acts as if it were this far ahead (every open contract's first reminder is due).
SWEEP_AHEAD = timedelta(days=4)


def sweep_moment() -> datetime:
    """``SWEEP_AHEAD`` from now, moved into the reminder window (a weekday, 10:00 in Paris)."""
    moment = (datetime.now(UTC) + SWEEP_AHEAD).astimezone(ZoneInfo("Europe/Paris"))
    while moment.weekday() >= 5:
        moment += timedelta(days=1)
    return moment.replace(hour=10, minute=0, second=0, microsecond=0)


def build(system: System) -> None:
    """Bring the system into the states the docstring lists."""
    provider = system.provider
    system.start_workers("live", dramatiq_queue_prefetch=PREFETCH)

    # Outcomes: sent, failed (400), retried later (503).
    sends = [system.send(name) for name in ("signed", "open", "old", "failing", "flaky", "cancelled")]
    provider.failing.add(system.contracts["failing"])
    provider.flaky.add(system.contracts["flaky"])
    system.produce(*sends)

    def invitations_done() -> bool:
        for name in ("signed", "open", "old", "cancelled"):
            if [d.status for d in system.deliveries(name)] != ["sent"]:
                return False
        flaky = system.queue_figures()["emails"]["delayed"] == 1
        return flaky and [d.status for d in system.deliveries("failing")] == ["failed"]

    settle(invitations_done, system, "the invitations")

    # Signed, cancelled, refused (a raw message that breaks the binding) and poisoned.
    signed = system.payloads["signed"]
    system.produce(
        (
            "notify",
            {
                "contract_id": signed["contract_id"],
                "legal_name": signed["company_name"],
                "accepted_sections": [s["id"] for s in signed["sections"]],
            },
        ),
        ("cancel", {"contract_id": system.contracts["cancelled"]}),
    )
    rejected = system.send("rejected", email=system.payloads["open"]["email"], company_name="Autre SARL")[1]
    system.enqueue_message("contracts", "send_contract", rejected)
    system.enqueue_raw("contracts", "{not json")

    def refusals_done() -> bool:
        if system.contract_status("signed") != "signed" or system.contract_status("cancelled") != "cancelled":
            return False
        if system.contract_status("rejected") != "rejected":
            return False
        notified = [d.status for d in system.deliveries("signed") if d.kind == "signed_notification"]
        dead = system.database_figures(datetime.now(UTC))["dead_letters"]
        return notified == ["sent"] and dead == {"send_contract": 1, "deliver_email": 1, "(malformed)": 1}

    settle(refusals_done, system, "the signature, the cancellation and the dead letters")

    # A reminder sweep; its reminders are sent.
    system.produce(("sweep", sweep_moment().isoformat()))

    def reminders_done() -> bool:
        open_contracts = ("open", "old", "failing", "flaky")
        reminders = [d for name in open_contracts for d in system.deliveries(name) if d.kind == "reminder"]
        figures = system.queue_figures()
        busy = any(figures[q]["ready"] or figures[q]["in_flight"] for q in QUEUES)
        return len(reminders) == 4 and all(d.status == "sent" for d in reminders) and not busy

    settle(reminders_done, system, "the reminders")

    # The windows' edges: one email sent 3 h ago (last day only), one 2 days ago (neither),
    # one failed 3 h ago.
    system.backdate("signed", "invitation", timedelta(hours=3))
    system.backdate("old", "invitation", timedelta(days=2))
    system.backdate("failing", "invitation", timedelta(hours=3))

    # Workers holding messages: "live" blocks on the provider with one email (an
    # invitation sent again: a deliver_email message; a contract's first invitation
    # goes out inside its send_contract) and one contract; then "killed" does the
    # same and is SIGKILLed; two contracts stay ready.
    provider.hold.set()
    system.produce(("resend", system.contracts["open"]))
    live = system.broker_ids["live"]
    settle(lambda: provider.held_requests() == 1, system, "the live worker to block")
    system.produce(system.send("stuck-live"))
    settle(lambda: system.acks(live, "contracts") == 1, system, "the live worker to hold a contract")

    system.start_workers("killed", dramatiq_queue_prefetch=PREFETCH)
    killed = system.broker_ids["killed"]
    system.produce(("resend", system.contracts["old"]))
    settle(lambda: provider.held_requests() == 2, system, "the second worker to block")
    system.produce(system.send("stuck-killed"))
    settle(lambda: system.acks(killed, "contracts") == 1, system, "the second worker to hold a contract")
    system.produce(system.send("ready-1"), system.send("ready-2"))
    settle(lambda: system.queue_figures()["contracts"]["ready"] == 2, system, "two ready contracts")
    system.workers.pop("killed").kill()

    # Long enough for ``status`` (with its short heartbeat timeout) to call it dead.
    def killed_is_silent() -> bool:
        beats = system.heartbeats()
        return beats[live] - beats[killed] > STATUS_HEARTBEAT_TIMEOUT_MS + 2 * MAINTENANCE_MS

    settle(killed_is_silent, system, "the killed worker's heartbeat to age")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def system(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    test_environment: dict[str, str],
) -> Iterator[System]:
    directory = tmp_path_factory.mktemp(f"status-{request.param}")
    urls: Iterator[str]
    if request.param == "sqlite":
        urls = iter([f"sqlite:///{directory / 'status.db'}"])
    else:
        urls = _postgres_schema_url()
    url = next(urls)
    try:
        with open_system(test_environment, directory, redis_server.url, url) as running:
            try:
                build(running)
            except BaseException:
                print(running.logs())
                raise
            yield running
    finally:
        for _ in urls:  # drops the PostgreSQL schema
            pass


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_json_figures_equal_what_redis_and_the_database_hold(system: System) -> None:
    live, killed = system.broker_ids["live"], system.broker_ids["killed"]
    before, beats_before = system.queue_figures(), system.heartbeats()
    data = system.status_json()
    after, beats_after = system.queue_figures(), system.heartbeats()
    assert before == after, "the queues moved while status read them"
    taken_at = parse_time(data["taken_at"])
    assert data["errors"] == []

    # Queues: the raw Redis figures, and the states the test made.
    shown = {q["name"]: q for q in data["queues"]}
    assert list(shown) == list(QUEUES)
    for queue in QUEUES:
        raw = before[queue]
        figures = {key: shown[queue][key] for key in ("ready", "delayed", "in_flight", "dead")}
        assert figures == {key: raw[key] for key in figures}, queue
        if raw["oldest_ready_ms"] is None:
            assert shown[queue]["oldest_ready_age_seconds"] is None
        else:
            age = (taken_at.timestamp() * 1000 - raw["oldest_ready_ms"]) / 1000
            assert shown[queue]["oldest_ready_age_seconds"] == pytest.approx(age, abs=0.002)
    assert before["contracts"] == {
        "ready": 2,
        "delayed": 0,
        "in_flight": 2,  # one held by each worker, the killed one included
        "dead": 2,  # the refusal and the poisoned message
        "oldest_ready_ms": before["contracts"]["oldest_ready_ms"],
    }
    assert before["emails"]["in_flight"] == 2  # each worker's blocked email
    assert before["emails"]["delayed"] >= 1  # the 503, retried in 10 minutes
    assert before["emails"]["dead"] == 1  # the 400
    assert before["contracts"]["oldest_ready_ms"] is not None
    assert shown["contracts"]["oldest_ready_age_seconds"] > 0

    # Workers: the registered ones, alive by heartbeat age; the killed one is dead.
    workers = {w["worker_id"]: w for w in data["workers"]}
    assert set(workers) == set(system.registered()) == {live, killed}
    assert data["live_workers"] == 1
    assert workers[live]["alive"] is True
    assert workers[killed]["alive"] is False
    assert workers[killed]["pid"] == system.registered()[killed]["pid"]
    assert parse_time(workers[killed]["last_heartbeat"]).timestamp() * 1000 == pytest.approx(
        beats_before[killed], abs=1
    )
    live_beat = parse_time(workers[live]["last_heartbeat"]).timestamp() * 1000
    assert beats_before[live] - 1 <= live_beat <= beats_after[live] + 1
    silent = workers[killed]["silent_seconds"]
    assert silent == pytest.approx(taken_at.timestamp() - beats_before[killed] / 1000, abs=0.002)
    assert silent * 1000 > STATUS_HEARTBEAT_TIMEOUT_MS

    # The database: the same counts, computed from the rows.
    database = system.database_figures(taken_at)
    assert data["emails"] == database["emails"]
    assert data["contracts"] == database["contracts"]
    assert data["dead_letters"] == database["dead_letters"]
    assert data["contracts"] == {"sent": 4, "queued": 4, "signed": 1, "cancelled": 1, "rejected": 1}
    assert data["dead_letters"] == {"send_contract": 1, "deliver_email": 1, "(malformed)": 1}
    hour, day = data["emails"]["last_hour"], data["emails"]["last_day"]
    assert hour["invitation"]["sent"] == 2  # open and cancelled (signed: 3 h ago, old: 2 days ago)
    assert day["invitation"]["sent"] == 3
    assert "invitation" not in hour or hour["invitation"]["failed"] == 0
    assert day["invitation"]["failed"] == 1
    assert hour["reminder"] == {"sent": 4, "failed": 0}  # every contract sent and not signed
    assert hour["signed_notification"] == {"sent": 1, "failed": 0}

    sweep, expected = data["last_sweep"], database["last_sweep"]
    assert expected is not None and sweep is not None
    for key in ("claimed", "postponed", "lost_races", "codes_renewed", "redriven", "error"):
        assert sweep[key] == expected[key], key
    for key in ("started_at", "as_of", "finished_at"):
        assert parse_time(sweep[key]) == expected[key].replace(tzinfo=expected[key].tzinfo or UTC), key
    assert sweep["claimed"] == 4


def queue_row(output: str, queue: str) -> list[str]:
    """The cells of a queue's row in the table (the first line naming it)."""
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] == queue and len(cells) >= 6:
            return cells
    raise AssertionError(f"no row for {queue} in:\n{output}")


@ONE_DATABASE
def test_table_shows_the_figures(system: System) -> None:
    before = system.queue_figures()
    result = system.cli("status")
    assert result.returncode == 0, result.stderr
    # No email changed outcome near the windows' edges: now is close enough to the snapshot.
    data = system.database_figures(datetime.now(UTC))
    output = result.stdout
    for queue in QUEUES:
        cells = queue_row(output, queue)
        raw = before[queue]
        assert cells[1:5] == [str(raw[key]) for key in ("ready", "delayed", "in_flight", "dead")], cells
    assert "1 live worker" in output
    line = next(line for line in output.splitlines() if system.broker_ids["killed"] in line)
    assert line.split()[-1] == "dead"
    line = next(line for line in output.splitlines() if system.broker_ids["live"] in line)
    assert line.split()[-1] == "alive"
    for status, count in data["contracts"].items():
        assert any(line.split() == [status, str(count)] for line in output.splitlines()), status
    reminder = next(line.split() for line in output.splitlines() if line.split()[:1] == ["reminder"])
    day = data["emails"]["last_day"]["reminder"]
    hour = data["emails"]["last_hour"]["reminder"]
    assert reminder[1:] == [str(hour["sent"]), str(hour["failed"]), str(day["sent"]), str(day["failed"])]
    for actor, count in data["dead_letters"].items():
        assert any(line.split() == [actor, str(count)] for line in output.splitlines()), actor
    claimed = next(line.split() for line in output.splitlines() if line.split()[:1] == ["claimed"])
    assert claimed == ["claimed", str(data["last_sweep"]["claimed"])]


def watch(system: System, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [CLI, "status", "--watch", "0.3", *args],
        env=system.status_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@ONE_DATABASE
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_watch_prints_frames_until_stopped(system: System, stop: signal.Signals) -> None:
    process = watch(system, "--json")
    assert process.stdout is not None
    try:
        frames = [json.loads(process.stdout.readline()) for _ in range(3)]
        moments = [parse_time(frame["taken_at"]) for frame in frames]
        assert moments == sorted(moments) and len(set(moments)) == 3
        assert all(frame["contracts"] == frames[0]["contracts"] for frame in frames)
        process.send_signal(stop)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@ONE_DATABASE
def test_watch_table_repeats_frames(system: System) -> None:
    process = watch(system)
    assert process.stdout is not None
    # Reading blocks: a timer ends a watch that stops printing, so the test cannot hang.
    guard = threading.Timer(30, process.kill)
    guard.start()
    seen: list[str] = []
    try:
        while sum("contract-dispatch status" in line for line in seen) < 4:
            line = process.stdout.readline()
            assert line, f"the watch ended after {len(seen)} lines: {process.stderr}"
            seen.append(line)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        guard.cancel()
        if process.poll() is None:
            process.kill()
        process.wait()
    # Three whole frames, each with the queue table.
    assert sum(line.split()[:1] == ["contracts"] for line in seen) >= 3


@ONE_DATABASE
def test_unreachable_redis_exits_3_with_what_could_be_read(system: System) -> None:
    password = "pw-never-printed-91c4"
    unreachable = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    result = system.cli("status", "--json", env={"REDIS_URL": unreachable})
    assert result.returncode == 3, result.stderr
    assert password not in result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["queues"] == [] and data["workers"] == []
    assert any(error.startswith("broker: ConnectionError: ") for error in data["errors"]), data["errors"]
    assert all("\n" not in error for error in data["errors"]), data["errors"]
    database = system.database_figures(parse_time(data["taken_at"]))
    assert data["contracts"] == database["contracts"]
    assert data["emails"] == database["emails"]

    table = system.cli("status", env={"REDIS_URL": unreachable})
    assert table.returncode == 3
    assert "Could not read" in table.stdout and "broker" in table.stdout
    assert any(line.split() == ["signed", "1"] for line in table.stdout.splitlines())


def dump(system: System) -> dict[str, tuple[bytes | None, bool]]:
    """Every key of the namespace: its serialized value and whether it expires."""
    client = system.client
    keys = sorted(text(k) for k in client.scan_iter(match=f"{system.namespace}:*", count=1000))
    return {key: (client.dump(key), client.pttl(key) >= 0) for key in keys}


#: The keys a worker's maintenance tick may create in its namespace (sample claim, samples,
#: per-minute counts, registry, heartbeats).
MAINTENANCE_KEY = re.compile(
    r"^[^:]+:(__stats__:(depth_claim|depth|processed:\d+)|__workers__|__heartbeats__)$"
)


def test_status_writes_nothing(system: System, tmp_path: Path) -> None:
    # Stop the last worker: from now on only status could change anything.
    system.workers.pop("live").kill()
    claim = f"{system.namespace}:__stats__:depth_claim"
    settle(lambda: not system.client.exists(claim), system, "the sample slot to expire")
    everything = {text(k) for k in system.client.scan_iter(count=1000)}
    before = dump(system)
    assert f"{system.namespace}:__workers__" in before and f"{system.namespace}:__heartbeats__" in before
    page = tmp_path / "status.html"
    for args in (["--json"], ["--html", str(page)]):
        result = system.cli("status", *args)
        assert result.returncode == 0, result.stderr
    watcher = watch(system, "--json")
    assert watcher.stdout is not None
    for _ in range(2):
        watcher.stdout.readline()
    watcher.send_signal(signal.SIGTERM)
    assert watcher.wait(timeout=15) == 0
    assert dump(system) == before
    # Nor in any other namespace. Other namespaces' live workers (the in-process worker
    # of other tests) keep writing their own maintenance keys meanwhile: only those may appear.
    appeared = {text(k) for k in system.client.scan_iter(count=1000)} - everything
    assert all(
        MAINTENANCE_KEY.match(key) and not key.startswith(f"{system.namespace}:") for key in appeared
    ), appeared
    assert page.stat().st_size > 0


def test_status_never_starts_the_embedded_redis(test_environment: dict[str, str], tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {
        **{key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "BROKER_URL")},
        **{key: value for key, value in test_environment.items() if key not in ("REDIS_URL", "BROKER_URL")},
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'status.db'}",
    }
    get_engine(env["DATABASE_URL"])  # status reads a database; it never creates one
    result = subprocess.run(
        [CLI, "status", "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 3, result.stderr
    (error,) = json.loads(result.stdout)["errors"]
    assert error.startswith("broker: the embedded Redis is not running (ConnectionError: "), error
    assert not (data_dir / "redis").exists() or not any((data_dir / "redis").iterdir())


def test_message_counts_outlive_a_redis_outage_and_say_so_in_one_line(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker stopping during an outage flushes its counts: kept, and logged without a traceback."""
    import logging
    from types import SimpleNamespace

    import redis

    from tests.support import unique
    from workers.ops.history import ThroughputCounter, flush_counts, processed_key

    at = datetime.now(UTC).timestamp()
    counter = ThroughputCounter()
    counter.add("contracts", "done", at=at)
    broker = SimpleNamespace(middleware=[SimpleNamespace(throughput=counter)], namespace=unique("flush"))
    with caplog.at_level(logging.WARNING, logger="workers.ops.history"):
        flush_counts(broker, redis.Redis(port=free_port(), socket_connect_timeout=1))
    (record,) = [record for record in caplog.records if record.name == "workers.ops.history"]
    assert record.exc_info is None and "(ConnectionError)" in record.getMessage(), record.getMessage()

    client = redis_server.client()
    flush_counts(broker, client)
    key = processed_key(broker.namespace, int(at // 60 * 60))
    assert client.hget(key, "contracts:done") == b"1"
    client.delete(key)


def test_live_workers_on_an_unreadable_rabbitmq_are_the_registrys() -> None:
    # RabbitMQ could not be read (no queue figures): its consumer counts are unknown,
    # not zero; the workers' heartbeats in Redis still say who is alive.
    now = datetime.now(UTC)
    workers = [
        WorkerFigures(
            worker_id=f"w{index}", host="host", pid=index, last_heartbeat=now, silent_seconds=1.0, alive=alive
        )
        for index, alive in enumerate((True, True, False))
    ]
    snapshot = Snapshot(
        taken_at=now,
        queues=[],
        workers=workers,
        emails={},
        contracts={},
        dead_letters={},
        last_sweep=None,
        errors=["broker: cannot be read"],
        broker="rabbitmq",
    )
    assert snapshot.live_workers == 2
    assert snapshot.as_dict()["live_workers"] == 2
