"""``send_contracts``: the producer's checks for each contract, one enqueue for all of them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import dramatiq
import pytest
import redis
import redis.connection
from dramatiq.brokers.redis import RedisBroker
from redis.backoff import ConstantBackoff
from redis.retry import Retry

import contract_dispatch
import workers.cli
import workers.cli_bulk
import workers.redis_dispatch
from contract_dispatch import (
    BrokerUnavailable,
    Receipt,
    Rejected,
    contract_status,
    send_contract,
    send_contracts,
)
from tests.processes import TcpProxy, assert_said_the_batch_may_be_queued, run_send_contracts
from tests.support import (
    RedisServer,
    all_emails_sent,
    contract_payload,
    forget_namespace,
    unique,
    wait_for_contract,
    wait_until,
)
from workers.broker_errors import BatchMaybeQueued

#: A batch of 200 small messages is larger than this, in bytes; any other command is smaller.
BATCH_BYTES = 10_000


@pytest.fixture
def enqueue_calls(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> list[list[Any]]:
    """The messages of each ``enqueue_many`` call the producer makes while the test runs.

    They reach the broker only when the test runs a worker: a message no worker
    takes now would be processed during a later test, whose scripted provider
    answers it could take.
    """
    calls: list[list[Any]] = []
    original = workers.redis_dispatch.enqueue_many
    forward = "worker" in request.fixturenames

    def spy(broker: Any, messages: list[Any]) -> None:
        calls.append(list(messages))
        if forward:
            original(broker, messages)

    monkeypatch.setattr(workers.redis_dispatch, "enqueue_many", spy)
    return calls


def test_bulk_send_checks_each_contract_and_enqueues_the_accepted_ones_at_once(
    worker, standin, enqueue_calls
):
    bound = contract_payload()
    send_contract(**bound)
    wait_for_contract(bound["contract_id"], all_emails_sent(1), what="the first contract to be sent")

    first, second = contract_payload(), contract_payload()
    bad_lead_source = contract_payload(lead_source="billboard")
    other_company = contract_payload(email=bound["email"], company_name="Another Company SAS")
    unknown_workspace = contract_payload(workspace_id="ws-nowhere")
    results = send_contracts([first, bad_lead_source, second, other_company, unknown_workspace, bound])

    assert results[0] == Receipt(contract_id=first["contract_id"], status="queued")
    assert results[2] == Receipt(contract_id=second["contract_id"], status="queued")
    # Already accepted: its current status, and no second message.
    assert results[5] == Receipt(contract_id=bound["contract_id"], status="sent")
    refusals = [results[1], results[3], results[4]]
    assert all(isinstance(refusal, Rejected) for refusal in refusals)
    assert [refusal.code for refusal in refusals if isinstance(refusal, Rejected)] == [
        "invalid_lead_source",
        "email_bound_to_other_company",
        "unknown_workspace",
    ]
    assert "Another Company" not in str(results[3]) and bound["company_name"] not in str(results[3])

    (call,) = enqueue_calls
    assert [message.args[0]["contract_id"] for message in call] == [
        first["contract_id"],
        second["contract_id"],
    ]
    # On the bulk queue, which the worker consumes beside `contracts`.
    assert {(message.actor_name, message.queue_name) for message in call} == {
        ("send_contract_bulk", "contracts-bulk")
    }
    for payload in (first, second):
        report = wait_for_contract(
            payload["contract_id"], all_emails_sent(1), what="a bulk contract to be sent"
        )
        assert report.status == "sent"
        assert len(standin.accepted_for(f"invitation:{payload['contract_id']}:")) == 1
    for payload in (bad_lead_source, other_company, unknown_workspace):
        assert contract_status(payload["contract_id"]) is None
    assert len(standin.accepted_for(f"invitation:{bound['contract_id']}:")) == 1


def test_the_bulk_actor_is_send_contract_on_a_queue_of_its_own_and_in_the_wire_contract():
    import actors
    from models.messages import json_schemas

    assert {"contracts", "contracts-bulk"} <= actors.broker.get_declared_queues()
    assert actors.send_contract_bulk.fn is actors.send_contract.fn
    # The same retry policy (retry_when is a closure of its own, built the same way).
    policy = ("max_retries", "min_backoff", "max_backoff", "throws")
    bulk, alone = actors.send_contract_bulk.options, actors.send_contract.options
    assert set(bulk) == set(alone) and all(bulk[name] == alone[name] for name in policy)
    schema = json_schemas()["send_contract"]
    assert (schema["x-queue"], schema["x-bulk-actor"], schema["x-bulk-queue"]) == (
        "contracts",
        "send_contract_bulk",
        "contracts-bulk",
    )
    assert "x-bulk-queue" not in json_schemas()["notify_signatories"]


def test_a_worker_runs_a_contract_sent_alone_before_the_import_messages_it_has_fetched(redis_server):
    """The two actors' queues and priorities, on a one-thread Dramatiq worker in a namespace of its own.

    The thread is held on the import's first message while the worker has already
    fetched its second (Dramatiq prefetches two per thread): the contract sent
    alone, fetched after it, runs next all the same.
    """
    import actors

    namespace = unique("priority")
    client = redis_server.client()
    broker = RedisBroker(client=client, namespace=namespace, middleware=[])
    ran: list[str] = []
    running, release = threading.Event(), threading.Event()

    def record(label: str) -> None:
        ran.append(label)
        running.set()
        release.wait(timeout=30)

    alone, bulk = (
        dramatiq.actor(
            actor_name=real.actor_name, queue_name=real.queue_name, priority=real.priority, broker=broker
        )(record)
        for real in (actors.send_contract, actors.send_contract_bulk)
    )
    for label in ("import-1", "import-2", "import-3"):
        bulk.send(label)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        wait_until(running.is_set, timeout=30, what="the import's first message to run")
        wait_until(lambda: worker.work_queue.qsize() == 1, timeout=30, what="the second one fetched")
        alone.send("alone")
        wait_until(lambda: worker.work_queue.qsize() == 2, timeout=30, what="the contract sent alone fetched")
        release.set()
        wait_until(lambda: len(ran) == 4, timeout=30, what="all four messages to run")
        assert ran == ["import-1", "alone", "import-2", "import-3"]
    finally:
        release.set()
        worker.stop()
        forget_namespace(client, namespace)


def test_bulk_send_forgets_its_reservations_when_the_broker_is_down(database, monkeypatch):
    def unreachable(broker: Any, messages: list[Any]) -> None:
        raise redis.ConnectionError("connection refused")

    monkeypatch.setattr(workers.redis_dispatch, "enqueue_many", unreachable)
    payloads = [contract_payload(), contract_payload()]
    with pytest.raises(BrokerUnavailable):
        send_contracts(payloads)
    for payload in payloads:
        assert contract_status(payload["contract_id"]) is None


def test_bulk_send_with_an_unknown_argument_writes_nothing(database, enqueue_calls):
    good = contract_payload()
    missing = {"contract_id": "P-9"}
    bad: Any
    for bad, problem in (
        (
            {**contract_payload(), "colour": "blue"},
            "send_contract() got an unexpected keyword argument 'colour'",
        ),
        (missing, "send_contract() missing a required argument: 'email'"),
        ("P-9", "a str, not a mapping of send_contract's keyword arguments"),
        (None, "a NoneType, not a mapping"),
    ):
        with pytest.raises(TypeError) as caught:
            send_contracts([good, bad])
        assert str(caught.value).startswith(f"send_contracts: item 1: {problem}"), caught.value
        assert "_send_contract_payload" not in str(caught.value)
    assert contract_status(good["contract_id"]) is None
    assert enqueue_calls == []


def test_bulk_send_of_nothing_enqueues_nothing(database, enqueue_calls):
    assert send_contracts([]) == []
    assert enqueue_calls == []


def test_bulk_send_of_one_contract_twice_reserves_it_once_and_refuses_a_changed_copy(database, enqueue_calls):
    payload = contract_payload()
    changed = {**payload, "title": "Another title"}
    results = send_contracts([payload, payload, changed])

    queued = Receipt(contract_id=payload["contract_id"], status="queued")
    assert results[:2] == [queued, queued]
    assert isinstance(results[2], Rejected) and results[2].code == "contract_conflict"
    # Only queued (by the earlier line), so the refusal does not say "sent".
    assert "already received with different content" in results[2].message
    (call,) = enqueue_calls
    # Both copies go out, as two send_contract calls would; the worker records it once.
    assert [message.args[0]["contract_id"] for message in call] == [payload["contract_id"]] * 2
    report = contract_status(payload["contract_id"])
    # Queued, or already sent by a worker running beside the test.
    assert report is not None and report.status in ("queued", "sent")


def test_bulk_send_queues_a_refused_contract_again(database, enqueue_calls):
    from models.errors import UnknownWorkspace
    from models.sending import record_send_rejection
    from models.types import utc_now
    from workers.database import session_scope

    payload = contract_payload()
    with session_scope() as session:
        record_send_rejection(
            session, payload["contract_id"], UnknownWorkspace("not yet"), message=None, now=utc_now()
        )
    report = contract_status(payload["contract_id"])
    assert report is not None and report.status == "rejected"

    assert send_contracts([payload]) == [Receipt(contract_id=payload["contract_id"], status="queued")]
    report = contract_status(payload["contract_id"])
    # No longer rejected: queued, or already sent by a worker running beside the test.
    assert report is not None and report.status in ("queued", "sent")
    assert len(enqueue_calls) == 1


def test_bulk_reservation_never_claims_a_row_another_producer_reserved_after_the_check(database):
    """A contract reserved by someone else between the batch's read and its insert is not "created" here,
    so a broker failure of this call cannot release it."""
    from models.messages import SendContract, parse_message
    from models.sending import SendChecks, reserve_contract, reserve_contracts
    from models.types import utc_now
    from workers.database import session_scope

    ours, theirs = contract_payload(), contract_payload()
    messages = [parse_message(SendContract, payload) for payload in (ours, theirs)]
    with session_scope() as session:
        checks = SendChecks(session, messages)
        assert checks.read == {}
        for message in messages:
            checks.check(message)
    with session_scope() as other_producer:
        assert reserve_contract(other_producer, messages[1], now=utc_now())
    with session_scope() as session:
        created = reserve_contracts(session, messages, existing=checks.read, now=utc_now())
    assert created == {ours["contract_id"]}


def test_bulk_send_records_each_contract_as_a_single_send_does(database, monkeypatch):
    import contract_dispatch.producer
    from models.contract import Contract
    from workers.database import session_scope

    # Kept out of the broker: a running worker would move the rows on before they are compared.
    monkeypatch.setattr(contract_dispatch.producer, "_enqueue", lambda message: None)
    monkeypatch.setattr(contract_dispatch.producer, "_enqueue_many", lambda messages: None)
    single = contract_payload(title="Bureau privatif", resource_group_id="rg-1")
    bulk = {**single, "contract_id": single["contract_id"] + "-bulk"}
    send_contract(**single)
    assert send_contracts([bulk]) == [Receipt(contract_id=bulk["contract_id"], status="queued")]

    with session_scope() as session:
        rows = [session.get(Contract, payload["contract_id"]) for payload in (single, bulk)]
    # The content hash covers the contract id, which differs.
    first, second = (
        row.model_dump(exclude={"id", "content_hash", "created_at", "updated_at"}) for row in rows if row
    )
    assert first == second
    assert first["status"] == "queued" and first["sections"] and first["signatories"]
    created = [row.created_at for row in rows if row]
    assert all(moment.tzinfo is not None for moment in created)
    assert abs((created[1] - created[0]).total_seconds()) < 60


def test_a_contract_still_queued_holds_its_address_against_another_name(database, monkeypatch):
    """Rule 4's "first contract sent" is the producer's order: a later name is refused at once,
    not answered "queued" and refused by the worker (or binding the address if taken first)."""
    import contract_dispatch.producer
    from models.cancelling import record_cancellation
    from models.messages import CancelContract
    from models.types import utc_now
    from workers.database import session_scope

    # Kept out of the broker: the first contract must stay queued, as behind a busy worker.
    monkeypatch.setattr(contract_dispatch.producer, "_enqueue", lambda message: None)
    monkeypatch.setattr(contract_dispatch.producer, "_enqueue_many", lambda messages: None)
    first = contract_payload(company_name="Alpha Conseil")
    assert send_contract(**first).status == "queued"
    email = first["email"]

    with pytest.raises(Rejected) as other:
        send_contract(**contract_payload(email=email, company_name="Beta Conseil"))
    assert other.value.code == "email_bound_to_other_company"
    assert "Alpha" not in other.value.message
    with pytest.raises(Rejected) as case_only:
        send_contract(**contract_payload(email=email, company_name="ALPHA CONSEIL"))
    assert "differ only by letter case or spacing" in case_only.value.message
    same = contract_payload(email=email, company_name="Alpha Conseil")
    assert send_contract(**same).status == "queued"
    # The same contract sent again is not held against itself.
    assert send_contract(**first).status == "queued"

    bulk_other, bulk_same = (
        contract_payload(email=email, company_name=name) for name in ("Beta", first["company_name"])
    )
    results = send_contracts([bulk_other, bulk_same])
    assert isinstance(results[0], Rejected) and results[0].code == "email_bound_to_other_company"
    assert results[1] == Receipt(contract_id=bulk_same["contract_id"], status="queued")

    # Cancelled while queued, the contracts no longer hold the address.
    with session_scope() as session:
        for payload in (first, same, bulk_same):
            record_cancellation(session, CancelContract(contract_id=payload["contract_id"]), now=utc_now())
    beta = contract_payload(email=email, company_name="Beta Conseil")
    assert send_contract(**beta).status == "queued"


def test_bulk_send_refuses_a_second_name_for_an_address_earlier_in_the_batch(database, enqueue_calls):
    email = contract_payload()["email"]
    first, other, case_only, same = (
        contract_payload(email=email, company_name=name)
        for name in (
            "Atelier Martin SARL",
            "Atelier Dupont SARL",
            "atelier martin sarl",
            "Atelier Martin SARL",
        )
    )
    elsewhere = contract_payload(company_name="Atelier Dupont SARL")
    results = send_contracts([first, other, elsewhere, case_only, same])

    assert results[0] == Receipt(contract_id=first["contract_id"], status="queued")
    assert isinstance(results[1], Rejected) and results[1].code == "email_bound_to_other_company"
    assert "Martin" not in results[1].message
    assert results[2] == Receipt(contract_id=elsewhere["contract_id"], status="queued")
    assert isinstance(results[3], Rejected) and results[3].code == "email_bound_to_other_company"
    assert "differ only by letter case or spacing" in results[3].message
    assert results[4] == Receipt(contract_id=same["contract_id"], status="queued")
    (call,) = enqueue_calls
    assert [message.args[0]["contract_id"] for message in call] == [
        first["contract_id"],
        elsewhere["contract_id"],
        same["contract_id"],
    ]
    for refused in (other, case_only):
        assert contract_status(refused["contract_id"]) is None


def _messages(count: int) -> list[dramatiq.Message[Any]]:
    return [
        dramatiq.Message(queue_name="bulk", actor_name="bulk_actor", args=(index,), kwargs={}, options={})
        for index in range(count)
    ]


def test_a_batch_cut_short_on_its_way_to_redis_queues_none_of_its_messages(redis_server, monkeypatch):
    """All or none: the connection drops halfway through the batch's bytes, on each of redis-py's tries.

    Redis runs each complete command it reads, so without ``MULTI`` the first
    half of the batch would be queued, once per try.
    """
    namespace = unique("batch")
    client = redis_server.client()
    broker = RedisBroker(client=client, namespace=namespace, middleware=[])
    broker.declare_queue("bulk")
    send = redis.connection.AbstractConnection.send_packed_command

    def dropped_halfway(connection: Any, command: Any, check_health: bool = True) -> None:
        packed = b"".join(bytes(part) for part in command) if isinstance(command, list) else command
        if isinstance(packed, bytes) and len(packed) > BATCH_BYTES:
            send(connection, [packed[: len(packed) // 2]], check_health)
            connection.disconnect()
            raise redis.ConnectionError("connection reset by peer")
        send(connection, command, check_health)

    try:
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", dropped_halfway)
        with pytest.raises(redis.ConnectionError):
            workers.redis_dispatch.enqueue_many(broker, _messages(200))
        monkeypatch.undo()
        assert client.hlen(f"{namespace}:bulk.msgs") == 0
        assert client.llen(f"{namespace}:bulk") == 0

        workers.redis_dispatch.enqueue_many(broker, _messages(200))
        queued = client.lrange(f"{namespace}:bulk", 0, -1)
        assert len(queued) == len(set(queued)) == client.hlen(f"{namespace}:bulk.msgs") == 200
    finally:
        forget_namespace(client, namespace)
        client.close()


#: The end of the ``MULTI`` block a batch sends to Redis: the ``EXEC`` command, as RESP.
EXEC_COMMAND = b"*1\r\n$4\r\nEXEC\r\n"


def _exec_cutting_proxy(
    redis_server: RedisServer, *, back_after_seconds: float | None
) -> tuple[TcpProxy, list[float]]:
    """A proxy to the tests' Redis that drops the connection once a batch's ``EXEC`` went
    through (Redis runs the batch, its answer is lost), and accepts connections again
    ``back_after_seconds`` later (None: never). Also returns when it cut, once it has."""
    cuts: list[float] = []

    def after_exec(data: bytes) -> bool:
        if cuts or EXEC_COMMAND not in data:
            return False
        cuts.append(time.monotonic())
        if back_after_seconds is not None:
            threading.Timer(back_after_seconds, proxy.restore).start()
        return True

    proxy = TcpProxy("127.0.0.1", redis_server.port, cut_after=after_exec)
    return proxy.start(), cuts


def _queued_ids(client: redis.Redis, namespace: str) -> tuple[list[Any], int]:
    """The ids in the queue ``bulk``, and how many bodies its hash holds."""
    return client.lrange(f"{namespace}:bulk", 0, -1), client.hlen(f"{namespace}:bulk.msgs")


def test_a_batch_whose_answer_was_lost_is_queued_once(redis_server):
    """Redis ran the batch, the connection dropped before its answer: the retry finds the
    batch there and does not send it again (redis-py's own retry would queue it twice)."""
    namespace = unique("lost")
    direct = redis_server.client()
    proxy, cuts = _exec_cutting_proxy(redis_server, back_after_seconds=0.05)
    # Tries for 3 s: the proxy is back after 0.05 s, or later on a loaded machine.
    client = redis.Redis(port=proxy.port, retry=Retry(ConstantBackoff(0.1), 30))
    broker = RedisBroker(client=client, namespace=namespace, middleware=[])
    broker.declare_queue("bulk")
    try:
        workers.redis_dispatch.enqueue_many(broker, _messages(5))
        assert len(cuts) == 1, "the batch's EXEC went through the proxy, which then dropped"
        ids, bodies = _queued_ids(direct, namespace)
        assert len(ids) == len(set(ids)) == bodies == 5
    finally:
        proxy.stop()
        client.close()
        forget_namespace(direct, namespace)
        direct.close()


def test_a_batch_whose_answer_was_lost_with_redis_gone_may_be_queued(redis_server):
    """No attempt got through after the lost answer: the caller hears the batch may be queued
    (it is), not that nothing was sent."""
    namespace = unique("gone")
    direct = redis_server.client()
    proxy, cuts = _exec_cutting_proxy(redis_server, back_after_seconds=None)
    client = redis.Redis(port=proxy.port, retry=Retry(ConstantBackoff(0.05), 2))
    broker = RedisBroker(client=client, namespace=namespace, middleware=[])
    broker.declare_queue("bulk")
    try:
        with pytest.raises(BatchMaybeQueued):
            workers.redis_dispatch.enqueue_many(broker, _messages(5))
        assert len(cuts) == 1
        ids, bodies = _queued_ids(direct, namespace)
        assert len(ids) == bodies == 5
    finally:
        proxy.stop()
        client.close()
        forget_namespace(direct, namespace)
        direct.close()


@pytest.mark.slow
def test_send_contracts_whose_batch_answer_was_lost_says_it_may_be_queued_and_keeps_it_reserved(
    database, redis_server, test_environment
):
    proxy, cuts = _exec_cutting_proxy(redis_server, back_after_seconds=None)
    namespace = unique("answer")
    env = {
        **os.environ,
        **test_environment,
        "DATABASE_URL": database,
        "REDIS_NAMESPACE": namespace,
        "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0",
    }
    payloads = [contract_payload() for _ in range(3)]
    try:
        result = run_send_contracts(env, payloads)
    finally:
        proxy.stop()
        forget_namespace(redis_server.client(), namespace)
    assert len(cuts) == 1, result.stderr
    # Redis did queue the batch: a worker processes it as accepted.
    assert_said_the_batch_may_be_queued(result, payloads)


def test_ctrl_c_during_a_batch_of_send_contracts_waits_for_its_answer(
    database, enqueue_calls, tmp_path, capsys, monkeypatch
):
    """Stopped midway, a batch's contracts would stay reserved with no message, holding their addresses."""
    payloads = [contract_payload() for _ in range(4)]
    path = tmp_path / "contracts.jsonl"
    path.write_text("".join(json.dumps(payload) + "\n" for payload in payloads), encoding="utf-8")
    submit = contract_dispatch.submit_send_contracts

    def ctrl_c_midway(parsed: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        return submit(parsed)

    monkeypatch.setattr(contract_dispatch, "submit_send_contracts", ctrl_c_midway)
    assert workers.cli.main(["send-contracts", "--json", "--batch-size", "2", str(path)]) == 130
    out, err = capsys.readouterr()
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["queued", "queued"]
    assert err.splitlines()[-1].startswith(
        "interrupted: lines up to 2 were answered (sent or refused), those after it were not read"
    ), err
    (call,) = enqueue_calls
    assert [message.args[0]["contract_id"] for message in call] == [p["contract_id"] for p in payloads[:2]]
    assert [contract_status(p["contract_id"]) is None for p in payloads] == [False, False, True, True]


def test_a_second_ctrl_c_during_a_batch_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with workers.cli_bulk.ctrl_c_after_the_batch() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupted == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
