"""The message flow on both brokers: Redis and RabbitMQ (``BROKER_URL=amqp://…``).

Each broker gets a real ``contract-dispatch worker`` process of its own and the
same journeys: a send through the CLI (the producer API), provider failures
retried, a refusal dead-lettered with its reason and then retried with
``dead-letters retry``, and messages written by a producer without Python (one
valid, one that is not JSON).

RabbitMQ tests work in a virtual host created for this session (``rabbitmqctl
add_vhost``) and deleted at the end, since Dramatiq's RabbitMQ broker has no
namespace: queues are named after the actors' queues. The virtual host is made
with ``rabbitmqctl`` (root here) or, failing that, RabbitMQ's management API. They
skip on a machine without RabbitMQ, except when ``CI`` is set.
The Redis side works in a namespace of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urlsplit

import dramatiq
import pika
import pika.exceptions
import pytest
import redis
from dramatiq.common import current_millis
from dramatiq.errors import ConnectionClosed
from sqlmodel import col, delete, select

from contract_dispatch import contract_status, set_workspace
from models.dead_letter import DeadLetter
from models.types import utc_now
from tests.processes import (
    CLI,
    TcpProxy,
    WorkerProcess,
    assert_said_the_batch_may_be_queued,
    describe,
    run_cli,
    run_send_contracts,
)
from tests.rabbitmq_vhost import VhostUnavailable, virtual_host
from tests.sendgrid_standin import Answer, SendGridStandIn, contract_of
from tests.support import (
    RedisServer,
    all_emails_sent,
    contract_payload,
    forget_namespace,
    readme_message,
    send_args,
    unique,
    wait_for_contract,
    wait_until,
)
from workers import dead_letters
from workers.database import get_engine, session_scope
from workers.rabbitmq import ServiceRabbitmqBroker
from workers.redis_dispatch import enqueue_many

#: The RabbitMQ server the tests use (guest/guest on this machine and on CI).
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")

#: A worker process boots, connects and declares its queues within this, in seconds.
BOOT_TIMEOUT_SECONDS = 40

#: One CLI command never takes this long.
COMMAND_TIMEOUT_SECONDS = 60


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _ci():
        pytest.fail(f"CI is set but RabbitMQ is unusable: {reason}")
    pytest.skip(f"no RabbitMQ: {reason}")


@contextlib.contextmanager
def _own_vhost() -> Iterator[str]:
    """The AMQP URL of a virtual host of this test's own, deleted at its end."""
    try:
        with virtual_host(RABBITMQ_URL, prefix="contract-dispatch-test") as url:
            yield url
    except VhostUnavailable as exc:
        _unavailable(f"cannot create a virtual host ({exc})")


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """The AMQP URL of a virtual host created for this session, deleted at its end."""
    parts = urlsplit(RABBITMQ_URL)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2).close()
    except OSError as exc:
        _unavailable(f"nothing answers at {parts.hostname}:{parts.port} ({type(exc).__name__})")
    with _own_vhost() as url:
        yield url


@dataclass
class System:
    """A worker process on one broker, and what a test needs to reach that broker."""

    kind: str
    env: dict[str, str]
    namespace: str
    redis: redis.Redis
    amqp_url: str | None
    worker: WorkerProcess

    def ready(self) -> bool:
        """Whether the worker consumes: registered in Redis, or its queues declared on RabbitMQ."""
        if self.kind == "redis":
            return bool(self.redis.hlen(f"{self.namespace}:__workers__"))
        assert self.amqp_url is not None
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            try:
                consumers = channel.queue_declare("contracts", passive=True).method.consumer_count
            except pika.exceptions.ChannelClosedByBroker:
                return False
            return bool(consumers)
        finally:
            if connection.is_open:
                connection.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args)

    def enqueue_raw(self, body: bytes, *, message_id: str, queue: str = "contracts") -> None:
        """Write a message the way a producer in another language does (README).

        ``message_id`` is the Redis id on Redis (the message's ``options.redis_message_id``)
        and the AMQP message id on RabbitMQ.
        """
        if self.kind == "redis":
            redis_id = message_id
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(f"{self.namespace}:{queue}.msgs", redis_id, body)
                pipe.rpush(f"{self.namespace}:{queue}", redis_id)
                pipe.execute()
            return
        assert self.amqp_url is not None
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                exchange="",
                routing_key=queue,
                body=body,
                properties=pika.BasicProperties(delivery_mode=2, message_id=message_id),
                mandatory=True,
            )
        finally:
            connection.close()

    def dead_copies(self, queue: str) -> list[str]:
        """The message ids of the bodies in the broker's own dead-letter queue of ``queue``."""
        found: list[str] = []
        if self.kind == "redis":
            for raw in self.redis.hvals(f"{self.namespace}:{queue}.XQ.msgs"):
                with contextlib.suppress(ValueError, AttributeError):
                    found.append(json.loads(raw).get("message_id"))
            return found
        assert self.amqp_url is not None
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            while True:
                method, _properties, body = channel.basic_get(f"{queue}.XQ", auto_ack=False)
                if method is None:
                    break
                with contextlib.suppress(ValueError, AttributeError):
                    found.append(json.loads(body).get("message_id"))
            # Closing without acknowledging puts every message back.
            channel.close()
        finally:
            connection.close()
        return found


def raw_message(payload: dict[str, Any], *, kind: str) -> tuple[str, bytes]:
    """A send_contract message as JSON, with the Redis id field only where Redis needs it."""
    message = readme_message("send_contract", [payload])
    if kind != "redis":
        message["options"] = {}
    return message["message_id"], json.dumps(message).encode()


@pytest.fixture(scope="module", params=["redis", "amqp"])
def system(
    request: pytest.FixtureRequest,
    database: str,
    test_environment: dict[str, str],
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[System]:
    """A ``contract-dispatch worker`` on Redis, then on RabbitMQ, over the session's database."""
    kind = str(request.param)
    namespace = unique("brokers")
    env = {**os.environ, **test_environment, "DATABASE_URL": database, "REDIS_NAMESPACE": namespace}
    amqp_url = None
    if kind == "amqp":
        amqp_url = str(request.getfixturevalue("rabbitmq_url"))
        # Redis stays the coordination store (scheduler slots, parked dead-letter reasons).
        env["BROKER_URL"] = amqp_url
    log = tmp_path_factory.mktemp(f"worker-{kind}") / "worker.log"
    worker = WorkerProcess(env, log_path=log, threads=4).start()
    client = redis_server.client()
    built = System(kind=kind, env=env, namespace=namespace, redis=client, amqp_url=amqp_url, worker=worker)
    try:
        # A message written raw to RabbitMQ before its queue exists is unroutable.
        wait_until(built.ready, timeout=BOOT_TIMEOUT_SECONDS, what=f"the {kind} worker to consume")
        yield built
    finally:
        worker.terminate()
        forget_namespace(client, namespace)
        client.close()


def _log_of(system: System) -> str:
    return system.worker.log()[-4000:]


def record_of(message_id: str) -> DeadLetter | None:
    with session_scope() as session:
        return session.exec(select(DeadLetter).where(DeadLetter.message_id == message_id)).first()


def wait_record(message_id: str, *, status: str, what: str) -> DeadLetter:
    found: list[DeadLetter] = []

    def check() -> bool:
        record = record_of(message_id)
        if record is not None and record.status == status:
            found.append(record)
            return True
        return False

    wait_until(check, timeout=BOOT_TIMEOUT_SECONDS, what=what)
    return found[0]


def test_send_and_sign_through_the_cli(system: System, standin: SendGridStandIn) -> None:
    payload = contract_payload()
    sent = system.cli(*send_args(payload))
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["status"] == "queued"

    report = wait_for_contract(
        payload["contract_id"],
        all_emails_sent(1),
        timeout=BOOT_TIMEOUT_SECONDS,
        what=f"the invitation to be sent on {system.kind}: {_log_of(system)}",
    )
    (invitation,) = standin.accepted_for(f"invitation:{payload['contract_id']}:")
    assert invitation.to == [payload["email"]]
    assert report.emails[0].provider_message_id == invitation.message_id

    signed = system.cli(
        "notify-signatories",
        "--contract-id",
        payload["contract_id"],
        "--legal-name",
        payload["company_name"],
        "--accepted-section",
        "conditions",
        "--accepted-section",
        "tarifs",
    )
    assert signed.returncode == 0, signed.stderr
    final = wait_for_contract(
        payload["contract_id"],
        lambda r: r.status == "signed" and all_emails_sent(2)(r),
        timeout=BOOT_TIMEOUT_SECONDS,
        what="the signatory to be told",
    )
    assert [e.to for e in final.emails if e.kind == "signed_notification"] == [
        payload["signatories"][0]["email"]
    ]


def test_send_contracts_through_the_cli_enqueues_the_batch_at_once(
    system: System, standin: SendGridStandIn
) -> None:
    # One batch on either broker (on RabbitMQ one transaction): each accepted
    # contract sent once, the refused line alone refused.
    payloads = [contract_payload() for _ in range(3)]
    refused = contract_payload(lead_source="billboard")
    lines = [json.dumps(payloads[0]), json.dumps(refused), *(json.dumps(p) for p in payloads[1:])]
    result = subprocess.run(
        [CLI, "send-contracts", "--json"],
        env=system.env,
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [answer.get("status") or answer["error"]["code"] for answer in answers] == [
        "queued",
        "invalid_lead_source",
        "queued",
        "queued",
    ]
    for payload in payloads:
        wait_for_contract(
            payload["contract_id"],
            all_emails_sent(1),
            timeout=BOOT_TIMEOUT_SECONDS,
            what=f"a batch's invitation to be sent on {system.kind}: {_log_of(system)}",
        )
        assert len(standin.accepted_for(f"invitation:{payload['contract_id']}:")) == 1


#: The import behind which a contract is sent alone, and its invitations' answer time at
#: the provider, in seconds: 80 x 0.25 s on the worker's 4 threads keep it busy for 5 s.
IMPORT_CONTRACTS = 80
IMPORT_ANSWER_SECONDS = 0.25

#: At most this many of the import's invitations go out between a contract sent alone
#: being queued and its own invitation: what the worker holds when it is queued (4
#: threads, 8 prefetched), with room to spare. Behind the import it would be all of them.
AHEAD_OF_IT_AT_MOST = 24


def test_a_contract_sent_alone_is_not_queued_behind_an_import(
    system: System, standin: SendGridStandIn
) -> None:
    imported = [contract_payload() for _ in range(IMPORT_CONTRACTS)]
    slow = {payload["contract_id"] for payload in imported}

    def chooser(incoming: Any) -> Answer:
        slow_answer = Answer(delay=IMPORT_ANSWER_SECONDS, kind="slow")
        return slow_answer if contract_of(incoming.reference) in slow else Answer()

    def import_answered() -> list[float]:
        accepted = standin.accepted
        return [received.answered_at for received in accepted if contract_of(received.reference) in slow]

    standin.chooser = chooser
    try:
        result = run_cli(system.env, "send-contracts", stdin="".join(json.dumps(p) + "\n" for p in imported))
        assert result.returncode == 0, describe(result)
        # Queued from here, as a producer in another language does (the same actor and
        # queue as `send-contract`): milliseconds, where a second CLI start on a loaded
        # machine can take as long as the whole import.
        alone = contract_payload()
        message_id, body = raw_message(alone, kind=system.kind)
        system.enqueue_raw(body, message_id=message_id)
        queued_at = time.time()
        left = IMPORT_CONTRACTS - len(import_answered())
        assert left > 2 * AHEAD_OF_IT_AT_MOST, f"the import was nearly done ({left} left): nothing to tell"

        wait_for_contract(
            alone["contract_id"],
            all_emails_sent(1),
            timeout=BOOT_TIMEOUT_SECONDS,
            what=f"the contract sent alone on {system.kind}: {_log_of(system)}",
        )
        (invitation,) = standin.accepted_for(f"invitation:{alone['contract_id']}:")
        ahead = [t for t in import_answered() if queued_at < t <= invitation.answered_at]
        assert len(ahead) <= AHEAD_OF_IT_AT_MOST, f"{len(ahead)} of the import's {left} went out before it"
        # The import itself is worked through, each contract once.
        wait_until(
            lambda: len(import_answered()) >= IMPORT_CONTRACTS,
            timeout=BOOT_TIMEOUT_SECONDS,
            what=f"the import's invitations on {system.kind}",
        )
        assert len(import_answered()) == IMPORT_CONTRACTS
    finally:
        standin.chooser = None


def test_provider_failures_are_retried_then_sent(system: System, standin: SendGridStandIn) -> None:
    # The message is written raw, as a producer without Python does. Two transient
    # failures, within MAX_RETRIES=3: the third attempt goes through (retries travel
    # through the broker's delay queue).
    standin.script(Answer(status=503), Answer(status=500))
    payload = contract_payload()
    message_id, body = raw_message(payload, kind=system.kind)
    system.enqueue_raw(body, message_id=message_id)

    report = wait_for_contract(
        payload["contract_id"],
        all_emails_sent(1),
        timeout=BOOT_TIMEOUT_SECONDS,
        what=f"the invitation to be sent after two failures: {_log_of(system)}",
    )
    assert report.emails[0].attempts == 3
    statuses = [r.status for r in standin.requests if (r.reference or "").startswith("invitation:")]
    assert statuses[-3:] == [503, 500, 202]
    assert len(standin.accepted_for(f"invitation:{payload['contract_id']}:")) == 1


def test_refusal_is_dead_lettered_with_its_reason_then_retried(
    system: System, standin: SendGridStandIn
) -> None:
    workspace = unique("ws")
    payload = contract_payload(workspace_id=workspace)
    message_id, body = raw_message(payload, kind=system.kind)
    system.enqueue_raw(body, message_id=message_id)

    record = wait_record(message_id, status="dead", what=f"the refusal's dead letter: {_log_of(system)}")
    assert (record.actor_name, record.queue_name) == ("send_contract", "contracts")
    assert record.exception_type == "UnknownWorkspace"
    assert workspace in record.exception_message
    assert message_id in system.dead_copies("contracts"), _log_of(system)

    # With the broker unreachable: exit 3 and nothing changed (pika's own errors,
    # met when RabbitMQ's copies are read or removed, were a traceback and exit 1).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    if system.kind == "redis":
        env = {**system.env, "REDIS_URL": f"redis://127.0.0.1:{closed_port}/0"}
    else:
        env = {**system.env, "BROKER_URL": f"amqp://guest:guest@127.0.0.1:{closed_port}/nowhere"}
    for args in (["retry", str(record.id)], ["purge", str(record.id), "--yes"]):
        down = run_cli(env, "dead-letters", *args)
        assert down.returncode == 3, (down.returncode, down.stderr)
        assert "unavailable: the broker cannot be reached" in down.stderr and "Traceback" not in down.stderr
        unchanged = record_of(message_id)
        assert unchanged is not None and (unchanged.status, unchanged.retry_count) == ("dead", 0)

    # The cause is fixed; the SQL record is enough to send the message again.
    set_workspace(workspace, ["rg-1"])
    retried = system.cli("dead-letters", "retry", str(record.id))
    assert retried.returncode == 0, retried.stderr
    wait_for_contract(
        payload["contract_id"],
        lambda r: r.status == "sent" and all_emails_sent(1)(r),
        timeout=BOOT_TIMEOUT_SECONDS,
        what="the retried contract to be sent",
    )
    after = record_of(message_id)
    assert after is not None and (after.status, after.retry_count) == ("retried", 1)
    # The broker's own copy went with the retry: it is not counted twice.
    assert message_id not in system.dead_copies("contracts")
    assert len(standin.accepted_for(f"invitation:{payload['contract_id']}:")) == 1


def held_fields(record: DeadLetter) -> dict[str, Any]:
    """A record's fields as a worker holds them before its nack (``dead_letters.describe``'s)."""
    blank: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="contracts", actor_name="x", args=(), kwargs={}, options={}
    )
    names = dead_letters.describe(blank, None, now=utc_now()).keys()
    return record.model_dump(include=set(names))


def test_reason_held_before_the_nack_is_filed_if_the_worker_died_after_it(
    system: System, standin: SendGridStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    holds = f"{system.namespace}:__dead_letter_holds__"
    workspace = unique("ws")
    payload = contract_payload(workspace_id=workspace)
    message_id, body = raw_message(payload, kind=system.kind)
    system.enqueue_raw(body, message_id=message_id)
    filed = wait_record(message_id, status="dead", what=f"the refusal's dead letter: {_log_of(system)}")
    wait_until(lambda: not system.redis.hexists(holds, message_id), what="the hold to be released once filed")

    # What a worker killed between its nack and its record leaves behind: the message
    # in the broker's dead-letter queue, its reason held in Redis (two minutes ago, past
    # the grace), no SQL record. And one killed before its nack: a hold alone.
    fields = held_fields(filed)
    ghost = {**fields, "message_id": str(uuid.uuid4()), "contract_id": None}
    with session_scope() as session:
        session.exec(delete(DeadLetter).where(col(DeadLetter.id) == filed.id))
    coordinator = cast(Any, SimpleNamespace(coordination=system.redis, namespace=system.namespace))
    held_at = current_millis() - 2 * dead_letters.HOLD_GRACE_MS
    monkeypatch.setattr(dead_letters, "current_millis", lambda: held_at)
    dead_letters.hold(coordinator, fields)
    dead_letters.hold(coordinator, ghost)
    assert message_id in system.dead_copies("contracts")

    listed = system.cli("dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = [e for e in json.loads(listed.stdout) if e["message_id"] == message_id]
    assert entry["exception_type"] == "UnknownWorkspace", entry
    assert workspace in entry["exception_message"]
    refiled = record_of(message_id)
    assert refiled is not None and refiled.traceback == filed.traceback
    assert record_of(ghost["message_id"]) is None
    assert not system.redis.hexists(holds, message_id)
    assert not system.redis.hexists(holds, ghost["message_id"])


def _dead_copy_held(system: System, message_id: str) -> bool:
    """Whether ``contracts.XQ`` holds the copy of a message recorded under ``message_id``."""
    if system.kind == "redis":
        return system.redis.zscore(f"{system.namespace}:contracts.XQ", message_id) is not None
    from workers.rabbitmq import dead_copies

    assert system.amqp_url is not None
    # Only the connection parameters of the broker are read.
    broker: Any = SimpleNamespace(parameters=pika.URLParameters(system.amqp_url))
    return dead_copies(broker, "contracts", [message_id]) == {message_id}


def test_malformed_message_from_another_producer(system: System, standin: SendGridStandIn) -> None:
    # (test_provider_failures_are_retried_then_sent writes its valid message raw too.)
    # A body that is not JSON is dead-lettered with its reason, not dropped, and
    # the worker goes on with the next message.
    broken_id = str(uuid.uuid4())
    system.enqueue_raw(b"{not json", message_id=broken_id)
    broken = wait_record(broken_id, status="dead", what=f"the malformed message's record: {_log_of(system)}")
    assert broken.actor_name == "(malformed)"
    assert broken.exception_type == "DecodeError"
    assert "not a Dramatiq message" in broken.exception_message
    # Its copy in contracts.XQ is found by the id it was recorded under, and purged with it.
    # (The record is filed before the message is rejected to contracts.XQ.)
    wait_until(lambda: _dead_copy_held(system, broken_id), what="the malformed message's dead copy")
    purged = system.cli("dead-letters", "purge", str(broken.id), "--yes")
    assert purged.returncode == 0, purged.stderr
    assert not _dead_copy_held(system, broken_id)

    # Options that would run code or break Dramatiq's arithmetic die the same way, on both brokers.
    for options in ({"on_failure": "send_contract"}, {"retries": "many"}):
        bad_option = contract_payload()
        message_id, body = raw_message(bad_option, kind=system.kind)
        message = json.loads(body)
        message["options"].update(options)
        system.enqueue_raw(json.dumps(message).encode(), message_id=message_id)
        record = wait_record(message_id, status="dead", what=f"the record of {options}: {_log_of(system)}")
        assert record.exception_type == "MalformedMessage", (options, record.exception_message)
        assert record.attempts == 1

    after = contract_payload()
    message_id, body = raw_message(after, kind=system.kind)
    system.enqueue_raw(body, message_id=message_id)
    wait_for_contract(after["contract_id"], all_emails_sent(1), what="a message after the malformed ones")


# -- configuration and an unreachable broker (no RabbitMQ needed) ---------------


def test_health_sees_the_broker_and_its_live_workers(system: System) -> None:
    result = system.cli("health", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads(result.stdout)["checks"]
    assert all(check["ok"] for check in checks.values()), checks
    if system.kind == "amqp":
        # The broker is RabbitMQ's, and so is the word on who consumes.
        assert checks["broker"]["detail"].startswith("RabbitMQ at "), checks
        consumers = re.search(
            r"consumers (\d+) on contracts, (\d+) on contracts-bulk, (\d+) on emails",
            checks["workers"]["detail"],
        )
        assert consumers is not None and min(map(int, consumers.groups())) >= 1, checks
    else:
        assert "broker" not in checks
    assert set(checks) >= {"redis", "database", "email", "workers"}


def test_several_rabbitmq_nodes_are_tried_in_order(database: str, test_environment: dict[str, str]) -> None:
    """BROKER_URL names several nodes, ";" between them: the first that answers is used,
    by the producer and by health alike."""
    from workers.ops.rabbitmq_queues import amqp_connection, queue_state

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with _own_vhost() as amqp_url:
        down = f"amqp://guest:guest@127.0.0.1:{closed_port}/{amqp_url.rsplit('/', 1)[1]}"
        env = {
            **os.environ,
            **test_environment,
            "DATABASE_URL": database,
            "REDIS_NAMESPACE": unique("nodes"),
            "BROKER_URL": f"{down}; {amqp_url}",
        }

        sent = run_cli(env, *send_args(contract_payload()))
        assert sent.returncode == 0, sent.stderr
        with amqp_connection(amqp_url, timeout=5) as connection:
            assert queue_state(connection, "contracts").message_count == 1
        health = run_cli(env, "health", "--json", "--timeout", "2")
        broker = json.loads(health.stdout)["checks"]["broker"]
        assert broker["ok"], broker
        assert f"127.0.0.1:{closed_port}" in broker["detail"], broker


def test_broker_url_names_the_broker() -> None:
    from workers.settings import Settings

    amqp = Settings(broker_url="amqp://guest:guest@rabbit:5672/prod", redis_url="redis://coordination:6379/0")
    assert amqp.uses_rabbitmq
    # Redis keeps coordinating: REDIS_URL is left as it is.
    assert amqp.redis_url == "redis://coordination:6379/0"

    redis_broker = Settings(broker_url="rediss://cache:6380/0", redis_url=None)
    assert not redis_broker.uses_rabbitmq
    # One Redis: status, health and the scheduler read REDIS_URL.
    assert redis_broker.redis_url == "rediss://cache:6380/0"

    unset = Settings(broker_url=None, redis_url="redis://only:6379/0")
    assert not unset.uses_rabbitmq and unset.redis_url == "redis://only:6379/0"

    with pytest.raises(ValueError, match="BROKER_URL must start with"):
        Settings(broker_url="http://rabbit:15672/")
    # Several RabbitMQ nodes, each checked, kept as Dramatiq splits them.
    nodes = Settings(broker_url=" amqp://u:p@rabbit-1:5672/prod ; amqps://u:p@rabbit-2:5671/prod ;")
    assert nodes.uses_rabbitmq
    assert nodes.broker_url == "amqp://u:p@rabbit-1:5672/prod;amqps://u:p@rabbit-2:5671/prod"
    # Every node's password is a secret that outputs are redacted of.
    from workers.ops.health import secrets_of

    two = Settings(broker_url="amqp://u:first-pw@rabbit-1:5672/prod;amqp://u:second-pw@rabbit-2:5672/prod")
    assert {"first-pw", "second-pw"} <= set(secrets_of(two))
    with pytest.raises(ValueError, match="BROKER_URL must start with") as refused:
        Settings(broker_url="amqp://u:p@rabbit-1:5672/prod;redis://u:s3cret@cache:6379/0")
    assert "s3cret" not in str(refused.value)
    with pytest.raises(ValueError, match="two Redis servers"):
        Settings(broker_url="redis://a:6379/0", redis_url="redis://b:6379/0")


def test_unreachable_rabbitmq_is_reported_as_unavailable(
    database: str, test_environment: dict[str, str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = {
        **os.environ,
        **test_environment,
        "DATABASE_URL": database,
        "BROKER_URL": f"amqp://guest:guest@127.0.0.1:{closed_port}/nowhere",
    }
    payload = contract_payload()
    result = subprocess.run(
        [CLI, *send_args(payload)],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("unavailable: the message broker cannot be reached"), result.stderr
    # pika's own connection tracebacks are not shown to the user.
    assert "Traceback" not in result.stderr


def test_health_on_rabbitmq_without_consumers_or_broker_is_unhealthy(
    database: str, test_environment: dict[str, str]
) -> None:
    base = {**os.environ, **test_environment, "DATABASE_URL": database}

    def health(broker_url: str) -> tuple[int, dict[str, Any], str]:
        result = subprocess.run(
            [CLI, "health", "--json", "--timeout", "2"],
            env={**base, "BROKER_URL": broker_url},
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
        return result.returncode, json.loads(result.stdout)["checks"], result.stdout + result.stderr

    with _own_vhost() as amqp_url:
        # Reachable, but no worker ever consumed in this virtual host.
        code, checks, _ = health(amqp_url)
        assert code == 1
        assert checks["broker"]["ok"], checks
        assert "not declared yet" in checks["broker"]["detail"], checks
        assert not checks["workers"]["ok"]
        assert checks["workers"]["detail"].startswith("no live worker on RabbitMQ"), checks

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    code, checks, output = health(f"amqp://guest:s3cret-broker-pass@127.0.0.1:{closed_port}/nowhere")
    assert code == 1
    assert not checks["broker"]["ok"]
    assert checks["broker"]["detail"].startswith(
        f"RabbitMQ at 127.0.0.1:{closed_port}/nowhere does not answer"
    )
    assert "s3cret-broker-pass" not in output
    # Reported once, in the check: not also as pika's own tracebacks on stderr.
    assert "Traceback" not in output and "pika" not in output, output


def test_schedulers_on_rabbitmq_claim_their_slots_in_redis(redis_server: RedisServer) -> None:
    from workers.broker import build_broker
    from workers.rabbitmq import ServiceRabbitmqBroker
    from workers.scheduler import PeriodicJob, claim_slot
    from workers.settings import Settings

    namespace = unique("slots")
    settings = Settings(
        broker_url="amqp://guest:guest@127.0.0.1:5672/unused",
        redis_url=redis_server.url,
        redis_namespace=namespace,
    )
    # Two schedulers' brokers: building one opens no connection to RabbitMQ.
    first, second = build_broker(settings), build_broker(settings)
    assert isinstance(first, ServiceRabbitmqBroker)
    job = PeriodicJob(name="sweep-reminders", actor_name="sweep_reminders", interval=60, payload={})
    try:
        assert [claim_slot(first, job, now=600.0), claim_slot(second, job, now=630.0)] == [True, False]
        assert claim_slot(second, job, now=660.0)
    finally:
        client = redis_server.client()
        forget_namespace(client, namespace)
        client.close()


def _metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_status_and_metrics_on_rabbitmq_give_its_own_counts(
    test_environment: dict[str, str], redis_server: RedisServer, tmp_path: Any
) -> None:
    """No worker: ready, delayed and dead as RabbitMQ counts them, no consumer, in flight not told.

    The broker's figures do not depend on the database: one SQLite file of its own, not both databases.
    """
    from dramatiq.message import Message

    from workers.broker import build_broker
    from workers.settings import Settings

    namespace = unique("rabbit-status")
    with _own_vhost() as amqp_url:
        broker = build_broker(
            Settings(broker_url=amqp_url, redis_url=redis_server.url, redis_namespace=namespace)
        )
        try:
            broker.declare_queue("contracts")
            for index in range(3):
                broker.enqueue(Message("contracts", "send_contract", ({"n": index},), {}, {}))
            # A retry waiting for its time, in contracts.DQ while no worker holds it.
            broker.enqueue(Message("contracts", "send_contract", ({"n": 3},), {}, {}), delay=3_600_000)
        finally:
            broker.close()
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("", "contracts.XQ", b"{}", pika.BasicProperties(delivery_mode=2))
        finally:
            connection.close()

        env = {
            **os.environ,
            **test_environment,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'own.db'}",
            "BROKER_URL": amqp_url,
            "REDIS_URL": redis_server.url,
            "REDIS_NAMESPACE": namespace,
            "METRICS_DIR": str(tmp_path / "no-worker-ran-here"),
        }
        get_engine(env["DATABASE_URL"])  # status reads a database; it never creates one

        status = run_cli(env, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        data = json.loads(status.stdout)
        assert data["broker"] == "rabbitmq" and data["errors"] == []
        queues = {queue["name"]: queue for queue in data["queues"]}
        assert queues["contracts"] == {
            "name": "contracts",
            "ready": 3,
            "delayed": 1,
            "in_flight": None,
            "dead": 1,
            "oldest_ready_age_seconds": None,
            "consumers": 0,
        }
        # Not declared yet: nothing in it, nobody consuming.
        assert (queues["emails"]["ready"], queues["emails"]["consumers"]) == (0, 0)
        assert data["live_workers"] == 0 and data["workers"] == []

        table = run_cli(env, "status")
        assert table.returncode == 0, table.stderr
        contracts_row = next(
            line for line in table.stdout.splitlines() if line.strip().startswith("contracts")
        )
        assert contracts_row.split()[:5] == ["contracts", "3", "1", "n/a", "1"], table.stdout
        assert "consumers" in table.stdout
        consumed = "by their consumers on contracts, contracts-bulk and emails"
        # The table wraps that line at the terminal's width.
        assert f"Workers: none registered in Redis; 0 live, {consumed}" in " ".join(table.stdout.split())

        # A worker's depth sample (its maintenance tick's part): RabbitMQ's counts, stored
        # in Redis; a second one within the interval is not taken.
        from workers.ops.history import sample_rabbitmq_depth

        client = redis_server.client()
        try:
            assert sample_rabbitmq_depth(client, namespace, amqp_url, interval_ms=60_000)
            assert not sample_rabbitmq_depth(client, namespace, amqp_url, interval_ms=60_000)
        finally:
            client.close()

        page_path = tmp_path / "status.html"
        page = run_cli(env, "status", "--html", str(page_path))
        assert page.returncode == 0, page.stderr
        html = page_path.read_text()
        assert f"None registered in Redis; 0 live, {consumed} (see the queue table)." in html
        figures = dict(re.findall(r'data-figure="([^"]+)"[^>]*>([^<]*)<', html))
        assert figures["queues.contracts.ready"] == "3" and figures["queues.contracts.dead"] == "1"
        assert figures["queues.contracts.in_flight"] == figures["total.in_flight"] == "n/a"
        assert figures["queues.contracts.consumers"] == "0" and figures["live_workers"] == "0"
        # The depth chart draws the sample and the snapshot: what waits, in flight not counted.
        chart = html[html.index('id="chart-depth"') :]
        chart = chart[: chart.index("</svg>")]
        point = "4 waiting, in flight not counted (3 ready, 1 delayed, n/a in flight); 1 dead"
        points = re.findall(rf"<title>contracts at [^<]*: {re.escape(point)}</title>", chart)
        assert len(points) == 2, chart
        assert "<polyline" in chart

        metrics = run_cli(env, "metrics")
        assert metrics.returncode == 0, metrics.stderr
        samples = _metric_samples(metrics.stdout)
        depth = {
            dict(labels)["state"]: value
            for (name, labels), value in samples.items()
            if name == "contract_dispatch_queue_messages" and dict(labels)["queue"] == "contracts"
        }
        # No figure is made up for what RabbitMQ does not tell.
        assert depth == {"ready": 3.0, "delayed": 1.0, "dead": 1.0}
        assert not any(name == "contract_dispatch_queue_oldest_ready_age_seconds" for name, _ in samples)
        assert samples[("contract_dispatch_queue_consumers", (("queue", "contracts"),))] == 0.0
        assert samples[("contract_dispatch_live_workers", ())] == 0.0
        assert samples[("contract_dispatch_snapshot_source_up", (("source", "broker"),))] == 1.0

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env["BROKER_URL"] = f"amqp://guest:s3cret-broker-pass@127.0.0.1:{closed_port}/nowhere"
    down = run_cli(env, "status", "--json")
    assert down.returncode == 3, down.stdout + down.stderr
    assert [error.split(":")[0] for error in json.loads(down.stdout)["errors"]] == ["broker"]
    assert "s3cret-broker-pass" not in down.stdout + down.stderr


def test_status_and_health_see_the_live_workers_of_either_broker(system: System) -> None:
    result = system.cli("status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["live_workers"] >= 1, data
    # Either way the workers register in Redis, with their host and pid.
    alive = [worker for worker in data["workers"] if worker["alive"]]
    assert alive and {worker["host"] for worker in alive} == {socket.gethostname()}, data["workers"]
    queues = {queue["name"]: queue for queue in data["queues"]}
    if system.kind == "amqp":
        assert data["broker"] == "rabbitmq"
        # RabbitMQ's consumers say who is live; in flight it does not tell.
        assert queues["contracts"]["consumers"] >= 1 and queues["emails"]["consumers"] >= 1, queues
        assert queues["contracts"]["in_flight"] is None
    else:
        assert data["broker"] == "redis"
        assert isinstance(queues["contracts"]["in_flight"], int)
        assert queues["contracts"]["consumers"] is None
    health = system.cli("health", "--json", "--this-host")
    assert health.returncode == 0, health.stdout + health.stderr
    detail = json.loads(health.stdout)["checks"]["workers"]["detail"]
    assert detail.startswith("1 live worker on host"), detail
    # The messages the workers process are counted in the status history.
    from workers.ops.history import stats_prefix

    sent = system.cli(*send_args(contract_payload()))
    assert sent.returncode == 0, sent.stderr
    wait_until(
        lambda: bool(system.redis.keys(f"{stats_prefix(system.namespace)}:processed:*")),
        timeout=BOOT_TIMEOUT_SECONDS,
        what="the worker's message counts in the status history",
    )


def test_workers_on_rabbitmq_register_in_redis_and_are_forgotten_when_gone(
    test_environment: dict[str, str], redis_server: RedisServer, tmp_path: Any
) -> None:
    from workers.middleware.maintenance import heartbeats_key, workers_key
    from workers.ops.history import depth_key

    namespace = unique("rabbit-registry")
    client = redis_server.client()

    def registered() -> dict[int, str]:
        """pid -> broker id of every registration with a heartbeat."""
        found = {}
        for broker_id, info in client.hgetall(workers_key(namespace)).items():
            if client.zscore(heartbeats_key(namespace), broker_id) is not None:
                found[int(json.loads(info)["pid"])] = (
                    broker_id.decode() if isinstance(broker_id, bytes) else broker_id
                )
        return found

    with _own_vhost() as amqp_url:
        env = {
            **os.environ,
            **test_environment,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'own.db'}",
            "BROKER_URL": amqp_url,
            "REDIS_URL": redis_server.url,
            "REDIS_NAMESPACE": namespace,
            "HEARTBEAT_TIMEOUT_MS": "1000",
            "MAINTENANCE_INTERVAL_MS": "200",
            "HISTORY_SAMPLE_INTERVAL_MS": "1000",
        }
        survivor = WorkerProcess(env, log_path=tmp_path / "survivor.log", threads=1).start()
        victim = WorkerProcess(env, log_path=tmp_path / "victim.log", threads=1).start()
        try:
            wait_until(
                lambda: (
                    set(registered()) == set(survivor.children()) | set(victim.children())
                    and len(registered()) == 2
                ),
                timeout=BOOT_TIMEOUT_SECONDS,
                what="both workers to register in Redis",
            )
            # The status page's depth samples, from RabbitMQ's counts: in flight unknown,
            # one per interval however many workers tick.
            wait_until(
                lambda: client.zcard(depth_key(namespace)) >= 3,
                timeout=BOOT_TIMEOUT_SECONDS,
                what="depth samples from the workers on RabbitMQ",
            )
            samples = cast(
                list[tuple[bytes, float]], client.zrange(depth_key(namespace), 0, -1, withscores=True)
            )
            stamps = [int(score) for _, score in samples]
            assert all(later - earlier >= 1000 for earlier, later in itertools.pairwise(stamps)), stamps
            sample = json.loads(samples[-1][0])
            assert sample["q"]["contracts"] == [0, 0, None, 0], sample
            victims = set(victim.children())
            victim.kill()
            # No broker maintenance buries it on RabbitMQ: the survivor forgets it after
            # two heartbeat timeouts of silence.
            wait_until(
                lambda: set(registered()) == set(survivor.children()),
                timeout=15,
                what="the killed worker to be forgotten",
            )
            assert not victims & set(registered())
            assert survivor.terminate() == 0
            # A worker that stops unregisters itself.
            assert client.hlen(workers_key(namespace)) == 0
            assert client.zcard(heartbeats_key(namespace)) == 0
        finally:
            victim.kill()
            survivor.kill()
            forget_namespace(client, namespace)
            client.close()


class _EnqueueLog(dramatiq.Middleware):
    """What the broker's middleware saw enqueued; ``on_before(count)`` runs before each message."""

    def __init__(self, on_before: Callable[[int], None] | None = None) -> None:
        self.before: list[str] = []
        self.after: list[str] = []
        self.on_before = on_before

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: Any) -> None:
        self.before.append(message.message_id)
        if self.on_before is not None:
            self.on_before(len(self.before))

    def after_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: Any) -> None:
        self.after.append(message.message_id)


def _batch(count: int) -> list[dramatiq.Message[Any]]:
    return [
        dramatiq.Message(queue_name="bulk", actor_name="bulk_actor", args=(index,), kwargs={}, options={})
        for index in range(count)
    ]


def _queued_ids(amqp_url: str, queue_name: str) -> list[str]:
    """The ids of the messages on a queue, read without taking them (each is put back)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        ids: list[str] = []
        while True:
            method, _, body = channel.basic_get(queue_name, auto_ack=False)
            if method is None:
                return ids
            ids.append(json.loads(body)["message_id"])
    finally:
        connection.close()


def _rabbitmq_broker(url: str, middleware: list[dramatiq.Middleware]) -> ServiceRabbitmqBroker:
    return ServiceRabbitmqBroker(
        url=url,
        namespace=unique("batch"),
        coordination=lambda: pytest.fail("coordination is not used to enqueue"),
        confirm_delivery=True,
        middleware=middleware,
    )


@pytest.fixture
def own_vhost_url(rabbitmq_url: str) -> Iterator[str]:
    """A virtual host of this test's own (the session's holds the workers' queues)."""
    with _own_vhost() as url:
        yield url


def test_a_batch_on_rabbitmq_is_one_transaction_all_or_none(own_vhost_url: str) -> None:
    parts = urlsplit(own_vhost_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    through_proxy = own_vhost_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    # The connection drops while the third message is being published.
    log = _EnqueueLog(on_before=lambda seen: proxy.cut() if seen == 3 else None)
    broker = _rabbitmq_broker(through_proxy, [log])
    try:
        broker.declare_queue("bulk")
        with pytest.raises(ConnectionClosed):
            enqueue_many(broker, _batch(5))
        # Published one by one, the first two would be on the queue.
        assert _queued_ids(own_vhost_url, "bulk") == []
        assert log.after == []

        proxy.restore()
        log.on_before = None
        batch = _batch(200)
        enqueue_many(broker, batch)
        assert _queued_ids(own_vhost_url, "bulk") == [message.message_id for message in batch]
        assert log.after == [message.message_id for message in batch]
    finally:
        broker.close()
        proxy.stop()


def test_a_batch_on_rabbitmq_reaches_a_queue_deleted_since_it_was_declared(own_vhost_url: str) -> None:
    log = _EnqueueLog()
    broker = _rabbitmq_broker(own_vhost_url, [log])
    try:
        first = _batch(3)
        enqueue_many(broker, first)
        connection = pika.BlockingConnection(pika.URLParameters(own_vhost_url))
        connection.channel().queue_delete("bulk")
        connection.close()
        # This process still takes the queue for declared: RabbitMQ returns the
        # messages as unroutable, and they are published again once it is declared anew.
        second = _batch(4)
        enqueue_many(broker, second)
        assert _queued_ids(own_vhost_url, "bulk") == [message.message_id for message in second]
        assert log.after == [message.message_id for message in first + second]
    finally:
        broker.close()


@pytest.mark.slow
def test_the_producer_bench_runs_on_rabbitmq_in_a_virtual_host_of_its_own(rabbitmq_url: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "producer",
            "--broker",
            "rabbitmq",
            "--quick",
            "--no-save",
            "--database",
            "sqlite",
            "--producer-messages",
            "20",
            "--producer-bulk-messages",
            "60",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout
    assert "producer on sqlite on rabbitmq" in summary
    assert re.search(r"send_contract +\d+\.\d\d x raw .* vs raw broker\.enqueue \d+/s", summary), summary
    assert re.search(r"send_contracts +\d+\.\d\d x raw .*raw unconfirmed publish \d+/s", summary), summary
    # No Redis memory figure: the queues are RabbitMQ's.
    assert "Redis per queued message" not in summary


#: The start of an AMQP Tx.Commit method frame's payload: class 90 (tx), method 20 (commit).
TX_COMMIT = bytes([0x00, 0x5A, 0x00, 0x14])


@pytest.mark.slow
def test_a_batch_whose_commit_goes_unanswered_may_be_queued_and_stays_reserved(
    own_vhost_url: str, database: str, test_environment: dict[str, str], redis_server: RedisServer
) -> None:
    # The commit reaches RabbitMQ; its answer never comes back, and the broker stays
    # unreachable through every retry (about 6 s).
    parts = urlsplit(own_vhost_url)
    proxy = TcpProxy(
        parts.hostname or "127.0.0.1", parts.port or 5672, cut_after=lambda data: TX_COMMIT in data
    )
    proxy.start()
    namespace = unique("commit")
    env = {
        **os.environ,
        **test_environment,
        "DATABASE_URL": database,
        "REDIS_NAMESPACE": namespace,
        "BROKER_URL": own_vhost_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}"),
    }
    payloads = [contract_payload() for _ in range(3)]
    try:
        result = run_send_contracts(env, payloads)
    finally:
        proxy.stop()
        forget_namespace(redis_server.client(), namespace)
    assert_said_the_batch_may_be_queued(result, payloads)


def test_a_batch_committed_before_the_connection_dropped_is_not_published_again(
    own_vhost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _EnqueueLog()
    broker = _rabbitmq_broker(own_vhost_url, [log])
    read_returns = pika.BlockingConnection.process_data_events
    dropped: list[bool] = []

    def dropped_after_the_commit(connection: pika.BlockingConnection, time_limit: float | None = 0) -> None:
        if not dropped:
            dropped.append(True)
            raise pika.exceptions.StreamLostError("connection lost")
        read_returns(connection, time_limit)

    monkeypatch.setattr(pika.BlockingConnection, "process_data_events", dropped_after_the_commit)
    try:
        batch = _batch(5)
        enqueue_many(broker, batch)
        assert dropped == [True]
        assert _queued_ids(own_vhost_url, "bulk") == [message.message_id for message in batch]
        assert log.after == [message.message_id for message in batch]
    finally:
        broker.close()


def test_a_broker_that_never_answers_the_handshake_is_unavailable(
    rabbitmq_url: str, database: str, test_environment: dict[str, str]
) -> None:
    # A port that accepts connections and says nothing (a load balancer without a node).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    env = {
        **os.environ,
        **test_environment,
        "DATABASE_URL": database,
        "BROKER_URL": f"amqp://guest:guest@127.0.0.1:{port}/%2F?socket_timeout=1&stack_timeout=1",
    }
    payload = contract_payload()
    try:
        result = run_cli(env, *send_args(payload))
    finally:
        silent.close()
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("unavailable: the message broker cannot be reached"), result.stderr
    assert "Traceback" not in result.stderr
    assert contract_status(payload["contract_id"]) is None, "nothing reserved for a message never sent"


def test_a_refused_login_or_vhost_is_said_at_once_by_either_producer(
    rabbitmq_url: str, database: str, test_environment: dict[str, str]
) -> None:
    parts = urlsplit(rabbitmq_url)
    wrong_password = rabbitmq_url.replace(f"{parts.username}:{parts.password}@", f"{parts.username}:wrong@")
    unknown_vhost = f"{rabbitmq_url.rsplit('/', 1)[0]}/{unique('no-such-vhost')}"
    for url, said in (
        (wrong_password, "refused the connection (ProbableAuthenticationError: check the user and password)"),
        (unknown_vhost, "refused the connection (ProbableAccessDeniedError: check the vhost"),
    ):
        env = {**os.environ, **test_environment, "DATABASE_URL": database, "BROKER_URL": url}
        payload, batch = contract_payload(), contract_payload()
        single = run_cli(env, *send_args(payload))
        bulk = run_cli(env, "send-contracts", stdin=json.dumps(batch) + "\n")
        for result in (single, bulk):
            assert result.returncode == 3, result.stderr
            assert result.stderr.startswith(f"unavailable: the message broker {said}"), result.stderr
            assert "wrong" not in result.stderr and "Traceback" not in result.stderr
        assert contract_status(payload["contract_id"]) is None
        assert contract_status(batch["contract_id"]) is None


def test_a_batch_returned_as_unroutable_every_time_fails_saying_so(
    own_vhost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = _rabbitmq_broker(own_vhost_url, [])
    tries: list[int] = []

    def always_returned(messages: list[dramatiq.Message[Any]]) -> list[dramatiq.Message[Any]]:
        tries.append(len(messages))
        return messages

    monkeypatch.setattr(broker, "_publish_in_transaction", always_returned)
    try:
        with pytest.raises(ConnectionClosed, match="returned 2 messages as unroutable 6 times"):
            enqueue_many(broker, _batch(2))
        assert tries == [2] * 6
    finally:
        broker.close()
