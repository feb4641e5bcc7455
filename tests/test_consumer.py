"""The worker's Redis consumer (workers/consumer.py), found wanting by the chaos run.

- A fetch whose reply is lost when Redis restarts leaves its messages reserved by
  a living worker that never saw them; after a connection error the consumer puts
  them back on the queue.
- A malformed message (not JSON, a foreign ``queue_name``, no Redis id) is
  dead-lettered with its reason instead of stalling the consumer or killing a
  worker thread, and the messages behind it are processed.

Each test uses a namespace of its own on the session's Redis server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from sqlmodel import col, select

from models.dead_letter import DeadLetter
from tests.support import unique, wait_until
from workers import consumer
from workers.broker import ServiceRedisBroker
from workers.database import session_scope
from workers.settings import Settings, get_settings, reset_settings


def _broker(redis_server: Any) -> ServiceRedisBroker:
    broker = ServiceRedisBroker(client=redis_server.client(), namespace=unique("consumer"), middleware=[])
    broker.declare_queue("q")
    return broker


def _message(value: int) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name="q", actor_name="a", args=(value,), kwargs={}, options={})


def _receive(stream: Any, count: int) -> list[Any]:
    received: list[Any] = []

    def more() -> bool:
        message = next(stream)
        if message is not None:
            received.append(message)
        return len(received) >= count

    wait_until(more, timeout=10, what=f"{count} messages")
    return received


def _reserved(broker: ServiceRedisBroker, client: redis.Redis) -> set[str]:
    """Redis ids this worker fetched and has not acknowledged."""
    members = client.smembers(f"{broker.namespace}:__acks__.{broker.broker_id}.q")
    return {m.decode() if isinstance(m, bytes) else str(m) for m in members}


def test_messages_of_a_fetch_whose_reply_was_lost_are_put_back(redis_server):
    broker = _broker(redis_server)
    client = redis_server.client()
    stream = broker.consume("q", prefetch=10, timeout=50)
    broker.enqueue(_message(0))
    (first,) = _receive(stream, 1)

    lost = [broker.enqueue(_message(value)) for value in (1, 2)]
    # Redis ran this fetch, but its reply never reached the worker.
    broker.do_fetch("q", 10)
    assert len(_reserved(broker, client)) == 3
    consumer.note_connection_error()

    received = _receive(stream, 2)
    assert sorted(m.args[0] for m in received) == [1, 2]
    assert {m.message_id for m in received} == {m.message_id for m in lost}
    for message in [first, *received]:
        stream.ack(message)
    assert _reserved(broker, client) == set()
    assert client.hlen(f"{broker.namespace}:q.msgs") == 0


def test_what_the_worker_holds_is_not_put_back(redis_server):
    broker = _broker(redis_server)
    client = redis_server.client()
    stream = broker.consume("q", prefetch=10, timeout=50)
    for value in range(3):
        broker.enqueue(_message(value))
    held = _receive(stream, 3)
    consumer.note_connection_error()

    assert next(stream) is None  # reconciles, then finds nothing to fetch
    assert client.llen(f"{broker.namespace}:q") == 0
    assert len(_reserved(broker, client)) == 3
    for message in held:
        stream.ack(message)
    assert _reserved(broker, client) == set()


def test_a_closed_consumer_puts_the_rest_of_its_fetch_back(redis_server):
    broker = _broker(redis_server)
    client = redis_server.client()
    for value in range(4):
        broker.enqueue(_message(value))
    stream = broker.consume("q", prefetch=10, timeout=50)
    # One fetch takes all four; the worker stops after receiving the first.
    (first,) = _receive(stream, 1)
    assert len(_reserved(broker, client)) == 4
    stream.close()

    assert _reserved(broker, client) == {first.options["redis_message_id"]}
    assert client.llen(f"{broker.namespace}:q") == 3
    stream.ack(first)
    again = broker.consume("q", prefetch=10, timeout=50)
    assert sorted(m.args[0] for m in _receive(again, 3)) == [1, 2, 3]


def _write(client: redis.Redis, namespace: str, body_for: Callable[[str], bytes]) -> str:
    """HSET + RPUSH a raw body under a fresh Redis id; returns the id."""
    redis_id = str(uuid.uuid4())
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{namespace}:q.msgs", redis_id, body_for(redis_id))
        pipe.rpush(f"{namespace}:q", redis_id)
        pipe.execute()
    return redis_id


def _envelope(redis_id: str, **changes: Any) -> bytes:
    envelope = {
        "queue_name": "q",
        "actor_name": "a",
        "args": [1],
        "kwargs": {},
        "options": {"redis_message_id": redis_id},
        "message_id": redis_id,
        "message_timestamp": int(time.time() * 1000),
    }
    envelope.update(changes)
    return json.dumps(envelope).encode()


def test_malformed_messages_are_dead_lettered_with_their_reason(database, redis_server):
    broker = _broker(redis_server)
    client = redis_server.client()
    namespace = broker.namespace
    undecodable = _write(client, namespace, lambda _: b"\x00{not json")
    foreign = _write(client, namespace, lambda redis_id: _envelope(redis_id, queue_name="elsewhere"))
    no_id = _write(client, namespace, lambda redis_id: _envelope(redis_id, options={}))
    valid = broker.enqueue(_message(7))

    stream = broker.consume("q", prefetch=10, timeout=50)
    (received,) = _receive(stream, 1)
    assert received.message_id == valid.message_id
    stream.ack(received)

    dead = {m.decode() for m in client.zrange(f"{namespace}:q.XQ", 0, -1)}
    assert dead == {undecodable, foreign, no_id}
    assert _reserved(broker, client) == set()
    with session_scope() as session:
        records = {
            r.message_id: r
            for r in session.exec(
                select(DeadLetter).where(col(DeadLetter.message_id).in_([undecodable, foreign, no_id]))
            )
        }
    assert records[undecodable].exception_type == "DecodeError"
    assert "not json" not in records[undecodable].exception_message, "the body is not copied"
    assert records[foreign].exception_type == "MalformedMessage"
    assert "queue_name" in records[foreign].exception_message
    assert records[no_id].exception_type == "MalformedMessage"
    assert "redis_message_id" in records[no_id].exception_message
    assert all(r.actor_name == "(malformed)" and r.redis_message_id == r.message_id for r in records.values())


def test_an_idle_delay_or_maintenance_queue_is_polled_at_most_once_a_second(redis_server):
    """Their consumers back off up to PATIENT_POLL_MS; the queues in a hurry up to the worker timeout."""
    broker = _broker(redis_server)
    previous = get_settings()
    reset_settings(_backoffs(min_backoff_ms=5000))
    try:
        consumers = {
            name: broker.consume(name, prefetch=1, timeout=50)
            for name in ("q", "q.DQ", "emails", "maintenance", "maintenance.DQ")
        }
    finally:
        reset_settings(previous)
    timeouts = {}
    for name, made in consumers.items():
        assert isinstance(made, consumer.TolerantRedisConsumer)
        timeouts[name] = made.timeout
    assert timeouts == {"q": 50, "q.DQ": 1000, "emails": 50, "maintenance": 1000, "maintenance.DQ": 1000}


def test_the_patient_poll_never_makes_a_retry_wait_longer():
    """Under half the shortest retry delay of any actor (a first retry waits half of it at least)."""
    assert consumer.patient_poll_ms(_backoffs(min_backoff_ms=5000), worker_timeout_ms=50) == 1000
    assert (
        consumer.patient_poll_ms(
            _backoffs(min_backoff_ms=5000, deliver_email_min_backoff_ms=400), worker_timeout_ms=50
        )
        == 200
    )
    # Never under the worker's own idle timeout (the tests' 20 ms backoffs).
    assert consumer.patient_poll_ms(_backoffs(min_backoff_ms=20), worker_timeout_ms=50) == 50
    assert consumer.patient_poll_ms(_backoffs(min_backoff_ms=5000), worker_timeout_ms=2000) == 2000


def _backoffs(**retry_settings: int) -> Settings:
    """The tests' settings with these retry delays, the longest one at its default (an hour)."""
    return Settings(max_backoff_ms=3_600_000, **retry_settings)  # type: ignore[arg-type]
