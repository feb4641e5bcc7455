"""A running system in known states, for the ``contract-dispatch status`` tests.

Everything lives on the test's own Redis namespace, its own database (an SQLite
file or a PostgreSQL schema) and its own SendGrid stand-in, and is driven by
real ``contract-dispatch worker`` processes and the real producer API (in a
subprocess, so that it uses the test's namespace and database). The stand-in
answers each email by its delivery reference: 202, 400 (a permanent failure),
503 (a transient failure, retried much later) or, while ``hold`` is set, no
answer at all, which keeps the message in the worker that sent it.

The figures are read back from Redis with plain commands (``LLEN``, ``HLEN``,
``SCARD``, ``ZCARD``...) and from SQL with the models, never with the code
under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import redis
from sqlalchemy import func
from sqlmodel import col, select

from models.contract import Contract
from models.dead_letter import DeadLetter
from models.delivery import EmailDelivery
from models.reminders import ReminderSweep
from models.workspace import set_workspace
from tests.processes import WorkerProcess, run_cli
from tests.sendgrid_standin import Answer, Incoming, SendGridStandIn
from tests.support import contract_payload, unique, wait_until
from workers.database import dispose_engines, session_scope

#: The service's queues.
QUEUES = ("contracts", "contracts-bulk", "emails", "maintenance")

#: The workers' heartbeat timeout, in milliseconds: long, so that nothing a killed worker
#: holds comes back while a test looks at it.
WORKER_HEARTBEAT_TIMEOUT_MS = 300_000

#: The heartbeat timeout ``status`` is run with, in milliseconds: short, so that a killed
#: worker shows as dead within seconds (a living one heartbeats every ``MAINTENANCE_MS``).
STATUS_HEARTBEAT_TIMEOUT_MS = 3_000

#: Workers' maintenance (and heartbeat) interval, and depth-sample interval, in milliseconds.
MAINTENANCE_MS = 200

#: A retried email waits at least this long, in milliseconds: it stays delayed throughout.
RETRY_BACKOFF_MS = 600_000

#: Longest wait for anything the workers do, in seconds.
TIMEOUT = 45.0

#: The producer calls, run in a subprocess with the system's environment.
#: One process for the whole test (starting one per call costs a second each): a line of
#: JSON operations in, a line "ok" or the error out.
PRODUCER_SCRIPT = """
import json, sys, traceback
from datetime import datetime
from contract_dispatch.producer import (
    send_contract, notify_signatories, cancel_contract, resend_invitation, run_reminders,
)
for line in sys.stdin:
    try:
        for op, arguments in json.loads(line):
            if op == "send":
                send_contract(**arguments)
            elif op == "resend":
                resend_invitation(arguments)
            elif op == "notify":
                notify_signatories(**arguments)
            elif op == "cancel":
                cancel_contract(**arguments)
            elif op == "sweep":
                run_reminders(as_of=datetime.fromisoformat(arguments))
        print("ok", flush=True)
    except Exception:
        print(json.dumps(traceback.format_exc()), flush=True)
"""


def text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def message_timestamp(body: bytes | str | None) -> float | None:
    """A message's ``message_timestamp`` (None for a body that is not a message)."""
    try:
        stamp = json.loads(body or b"{}").get("message_timestamp")
    except (ValueError, AttributeError):
        return None
    return float(stamp) if isinstance(stamp, int | float) else None


class Provider:
    """The test's SendGrid stand-in, answering by delivery reference."""

    def __init__(self) -> None:
        self.failing: set[str] = set()  # contract ids whose invitation gets 400
        self.flaky: set[str] = set()  # contract ids whose invitation gets 503
        self.hold = threading.Event()  # set: requests wait until ``release``
        self.released = threading.Event()
        self.held = 0
        self._lock = threading.Lock()
        self.server = SendGridStandIn(chooser=self._choose).start()

    def _choose(self, incoming: Incoming) -> Answer:
        reference = incoming.reference or ""
        kind, _, rest = reference.partition(":")
        contract_id = rest.partition(":")[0]
        if kind == "invitation" and contract_id in self.failing:
            return Answer(status=400, body=b'{"errors":[{"message":"invalid"}]}', kind="400")
        if kind == "invitation" and contract_id in self.flaky:
            return Answer(status=503, kind="503")
        if self.hold.is_set():
            with self._lock:
                self.held += 1
            self.released.wait()
        return Answer()

    def held_requests(self) -> int:
        with self._lock:
            return self.held

    def stop(self) -> None:
        self.released.set()
        self.server.stop()


@dataclass
class System:
    """A namespace, a database, a provider and workers, plus what the test put there."""

    env: dict[str, str]
    namespace: str
    database_url: str
    client: redis.Redis
    provider: Provider
    directory: Path
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    #: Broker ids by worker name (``live``, ``killed``).
    broker_ids: dict[str, str] = field(default_factory=dict)
    contracts: dict[str, str] = field(default_factory=dict)
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    producer: subprocess.Popen[str] | None = None

    # -- driving it ------------------------------------------------------------

    def status_env(self, **overrides: str) -> dict[str, str]:
        env = dict(self.env, HEARTBEAT_TIMEOUT_MS=str(STATUS_HEARTBEAT_TIMEOUT_MS), COLUMNS="200")
        env.update(overrides)
        return env

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the CLI with the status environment (plus ``env``); it must end within a minute."""
        return run_cli(self.status_env(**(env or {})), *args)

    def status_json(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr + result.stdout
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def produce(self, *operations: tuple[str, Any]) -> None:
        """Run producer API calls, in order, in the producer process (started on first use)."""
        if self.producer is None:
            self.producer = subprocess.Popen(
                [sys.executable, "-c", PRODUCER_SCRIPT],
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        assert self.producer.stdin is not None and self.producer.stdout is not None
        self.producer.stdin.write(json.dumps(list(operations)) + "\n")
        self.producer.stdin.flush()
        # Bounded: a producer that stops answering is killed, and the read ends.
        guard = threading.Timer(TIMEOUT, self.producer.kill)
        guard.start()
        try:
            answer = self.producer.stdout.readline().strip()
        finally:
            guard.cancel()
        assert answer == "ok", json.loads(answer) if answer else "the producer died"

    def close(self) -> None:
        if self.producer is not None:
            self.producer.kill()
            self.producer.wait()
            self.producer = None

    def send(self, name: str, **overrides: Any) -> tuple[str, Any]:
        payload = contract_payload(contract_id=unique(name), **overrides)
        self.contracts[name] = payload["contract_id"]
        self.payloads[name] = payload
        return ("send", payload)

    def enqueue_raw(self, queue: str, body: str, message_id: str | None = None) -> str:
        """Write a message the way a producer in another language does."""
        message_id = message_id or str(uuid.uuid4())
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(f"{self.namespace}:{queue}.msgs", message_id, body)
            pipe.rpush(f"{self.namespace}:{queue}", message_id)
            pipe.execute()
        return message_id

    def enqueue_message(self, queue: str, actor: str, payload: dict[str, Any]) -> str:
        message_id = str(uuid.uuid4())
        message = {
            "queue_name": queue,
            "actor_name": actor,
            "args": [payload],
            "kwargs": {},
            "options": {"redis_message_id": message_id},
            "message_id": message_id,
            "message_timestamp": int(time.time() * 1000),
        }
        return self.enqueue_raw(queue, json.dumps(message), message_id)

    def start_workers(self, *names: str, **settings: str) -> None:
        before = set(self.heartbeats())
        for name in names:
            # A data directory each: their metric files must not mix.
            env = dict(self.env, DATA_DIR=str(self.directory / f"data-{name}"), **settings)
            self.workers[name] = WorkerProcess(
                env, log_path=self.directory / f"{name}.log", processes=1, threads=1
            ).start()

        def registered() -> bool:
            for worker in self.workers.values():
                assert worker.alive(), self.logs()
            return len(set(self.registered()) - before) == len(names)

        wait_until(registered, timeout=TIMEOUT, what=f"workers {names} to register")
        for name in names:
            (pid,) = self.workers[name].children()
            (broker_id,) = [b for b, info in self.registered().items() if info.get("pid") == pid]
            self.broker_ids[name] = broker_id

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{w.log()}" for name, w in self.workers.items())

    # -- reading it back, independently of the code under test -----------------

    def heartbeats(self) -> dict[str, float]:
        key = f"{self.namespace}:__heartbeats__"
        pairs = cast(list[tuple[bytes, float]], self.client.zrange(key, 0, -1, withscores=True))
        return {text(k): float(v) for k, v in pairs}

    def registered(self) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(f"{self.namespace}:__workers__")
        return {text(k): json.loads(v) for k, v in raw.items()}

    def acks(self, broker_id: str, queue: str) -> int:
        return int(self.client.scard(f"{self.namespace}:__acks__.{broker_id}.{queue}"))

    def queue_figures(self) -> dict[str, dict[str, Any]]:
        """Per queue: LLEN, HLEN of the delay queue, SCARD of every worker's acks, ZCARD of the XQ."""
        ns = self.namespace
        figures: dict[str, dict[str, Any]] = {}
        ack_keys = [text(k) for k in self.client.scan_iter(match=f"{ns}:__acks__.*", count=1000)]
        for queue in QUEUES:
            ids = [text(i) for i in self.client.lrange(f"{ns}:{queue}", 0, -1)]
            stamps = [message_timestamp(self.client.hget(f"{ns}:{queue}.msgs", i)) for i in ids]
            numbers = [s for s in stamps if s is not None]
            figures[queue] = {
                "ready": int(self.client.llen(f"{ns}:{queue}")),
                "delayed": int(self.client.hlen(f"{ns}:{queue}.DQ.msgs")),
                "in_flight": sum(int(self.client.scard(k)) for k in ack_keys if k.endswith(f".{queue}")),
                "dead": int(self.client.zcard(f"{ns}:{queue}.XQ")),
                "oldest_ready_ms": min(numbers) if numbers else None,
            }
        return figures

    def database_figures(self, now: datetime) -> dict[str, Any]:
        """Emails by window, kind and outcome, contracts by status, dead letters, last sweep."""
        with session_scope(self.database_url) as session:
            deliveries = list(session.exec(select(EmailDelivery)).all())
            contracts = dict(
                session.exec(select(Contract.status, func.count()).group_by(Contract.status)).all()
            )
            dead = dict(
                session.exec(
                    select(DeadLetter.actor_name, func.count())
                    .where(DeadLetter.status == "dead")
                    .group_by(DeadLetter.actor_name)
                ).all()
            )
            sweep = session.exec(
                select(ReminderSweep).order_by(col(ReminderSweep.started_at).desc()).limit(1)
            ).first()
            last_sweep = None if sweep is None else sweep.model_dump()
        emails: dict[str, dict[str, dict[str, int]]] = {}
        for window, span in (("last_hour", timedelta(hours=1)), ("last_day", timedelta(days=1))):
            counts: dict[str, dict[str, int]] = {}
            for d in deliveries:
                if d.status == "sent" and d.sent_at is not None and d.sent_at >= now - span:
                    counts.setdefault(d.kind, {"sent": 0, "failed": 0})["sent"] += 1
                elif d.status == "failed" and d.updated_at >= now - span:
                    counts.setdefault(d.kind, {"sent": 0, "failed": 0})["failed"] += 1
            emails[window] = counts
        return {"emails": emails, "contracts": contracts, "dead_letters": dead, "last_sweep": last_sweep}

    def deliveries(self, contract_name: str) -> list[EmailDelivery]:
        with session_scope(self.database_url) as session:
            contract_id = self.contracts[contract_name]
            return list(
                session.exec(select(EmailDelivery).where(EmailDelivery.contract_id == contract_id)).all()
            )

    def contract_status(self, name: str) -> str | None:
        with session_scope(self.database_url) as session:
            contract = session.get(Contract, self.contracts[name])
            return None if contract is None else contract.status

    def backdate(self, contract_name: str, kind: str, age: timedelta) -> None:
        """Move an email's outcome ``age`` into the past (the windows' edges)."""
        with session_scope(self.database_url) as session:
            contract_id = self.contracts[contract_name]
            for delivery in session.exec(
                select(EmailDelivery).where(
                    EmailDelivery.contract_id == contract_id, EmailDelivery.kind == kind
                )
            ).all():
                moment = datetime.now(UTC) - age
                delivery.updated_at = moment
                if delivery.sent_at is not None:
                    delivery.sent_at = moment
                session.add(delivery)


def make_env(
    test_environment: dict[str, str],
    directory: Path,
    *,
    namespace: str,
    database_url: str,
    provider: Provider,
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(test_environment)
    env.update(
        DATA_DIR=str(directory / "data"),
        REDIS_NAMESPACE=namespace,
        DATABASE_URL=database_url,
        SENDGRID_API_HOST=provider.server.url,
        SENDGRID_TIMEOUT="300",
        SEND_LEASE_SECONDS="600",
        HEARTBEAT_TIMEOUT_MS=str(WORKER_HEARTBEAT_TIMEOUT_MS),
        MAINTENANCE_INTERVAL_MS=str(MAINTENANCE_MS),
        HISTORY_SAMPLE_INTERVAL_MS=str(MAINTENANCE_MS),
        MIN_BACKOFF_MS=str(RETRY_BACKOFF_MS),
        MAX_BACKOFF_MS=str(2 * RETRY_BACKOFF_MS),
        METRICS_PORT="0",
    )
    return env


@contextlib.contextmanager
def open_system(
    test_environment: dict[str, str], directory: Path, redis_url: str, database_url: str
) -> Iterator[System]:
    """A fresh namespace and provider on ``database_url``; everything is stopped and removed after."""
    with session_scope(database_url) as session:
        set_workspace(session, "ws-main", ["rg-1"])
    namespace = unique("status")
    provider = Provider()
    client = redis.Redis.from_url(redis_url)
    env = make_env(
        test_environment, directory, namespace=namespace, database_url=database_url, provider=provider
    )
    env["REDIS_URL"] = redis_url
    system = System(
        env=env,
        namespace=namespace,
        database_url=database_url,
        client=client,
        provider=provider,
        directory=directory,
    )
    try:
        yield system
    finally:
        system.close()
        for worker in system.workers.values():
            if worker.alive():
                worker.kill()
        provider.stop()
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
        client.close()
        dispose_engines()


def settle(check: Callable[[], bool], system: System, what: str) -> None:
    def done() -> bool:
        for worker in system.workers.values():
            assert worker.alive(), system.logs()
        return check()

    wait_until(done, timeout=TIMEOUT, what=what)
