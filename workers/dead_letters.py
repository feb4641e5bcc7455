"""Dead-letter operations: record, list, retry and purge, with Redis kept consistent.

A message that fails for good sits in Dramatiq's Redis dead-letter queue
(``{namespace}:{queue}.XQ``, a sorted set, and ``.XQ.msgs``, a hash, both keyed
by the Redis message id) and, with its reason, in the ``dead_letters`` table. SQL
is the record operators work from; retrying or purging removes the Redis copy
too. When SQL cannot be written at the moment a message dies, the reason waits
in Redis (``{namespace}:__dead_letter_reasons__``) and ``sync`` files it later.
"""

from __future__ import annotations

import json
import logging
import time
import traceback as traceback_module
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy.exc import OperationalError
from sqlmodel import select

from models.dead_letter import DeadLetter, DeadLetterStatus, mark_retried, record_dead_letter
from models.delivery import reopen_delivery
from models.messages import contract_id_of
from models.types import utc_now
from workers.database import session_scope

logger = logging.getLogger(__name__)

#: How long recording a dead letter keeps retrying a failing database, in seconds.
RECORD_PATIENCE_SECONDS = 10.0

#: Options a message carries from one attempt to the next (see DeadLetters middleware).
ATTEMPTS_OPTION = "attempts"
FIRST_FAILED_OPTION = "first_failed_at"


def canonical_queue(queue_name: str) -> str:
    """``emails.DQ`` and ``emails`` share one dead-letter queue: ``emails``."""
    return queue_name.removesuffix(".DQ")


def _reasons_key(broker: RedisBroker) -> str:
    return f"{broker.namespace}:__dead_letter_reasons__"


def _xq_keys(broker: RedisBroker, queue_name: str) -> tuple[str, str]:
    base = f"{broker.namespace}:{canonical_queue(queue_name)}.XQ"
    return base, f"{base}.msgs"


def _from_millis(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def describe(
    message: dramatiq.Message[Any], exception: BaseException | None, *, now: datetime
) -> dict[str, Any]:
    """The dead-letter fields of a message that just died."""
    options = dict(message.options)
    args = list(message.args) if isinstance(message.args, list | tuple) else [message.args]
    if exception is not None:
        exception_type = type(exception).__name__
        exception_message = str(exception)
        trace: str | None = "".join(traceback_module.format_exception(exception))
    else:
        exception_type = "Unknown"
        exception_message = "the message was dead-lettered without an exception"
        trace = options.get("traceback")
    return {
        "message_id": message.message_id,
        "redis_message_id": options.get("redis_message_id"),
        "queue_name": canonical_queue(message.queue_name),
        "actor_name": message.actor_name,
        "contract_id": contract_id_of(args[0]) if args else None,
        "message_args": json.loads(json.dumps(args, default=str)),
        "message_kwargs": json.loads(json.dumps(dict(message.kwargs or {}), default=str)),
        "exception_type": exception_type,
        "exception_message": exception_message,
        "traceback": trace,
        "attempts": max(1, int(options.get(ATTEMPTS_OPTION) or 1)),
        "first_failed_at": _from_millis(options.get(FIRST_FAILED_OPTION)) or now,
        "last_failed_at": now,
    }


def record(broker: RedisBroker, fields: dict[str, Any]) -> None:
    """File a dead letter in SQL; if the database stays down, park the reason in Redis."""
    deadline = time.monotonic() + RECORD_PATIENCE_SECONDS
    pause = 0.2
    while True:
        try:
            with session_scope() as session:
                record_dead_letter(session, **fields)
            return
        except OperationalError:
            if time.monotonic() > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
    logger.warning(
        "The database is unreachable: the reason of dead message %s waits in Redis until it can be filed.",
        fields["message_id"],
    )
    parked = {k: (v.timestamp() * 1000 if isinstance(v, datetime) else v) for k, v in fields.items()}
    broker.client.hset(_reasons_key(broker), fields["message_id"], json.dumps(parked, default=str))


def sync(broker: RedisBroker, queues: Iterable[str]) -> int:
    """File every Redis dead letter that SQL does not know yet; returns how many were filed."""
    filed = 0
    reasons_key = _reasons_key(broker)
    for queue in {canonical_queue(q) for q in queues}:
        xq, xq_msgs = _xq_keys(broker, queue)
        for redis_id, raw in broker.client.hgetall(xq_msgs).items():
            try:
                message = dramatiq.Message.decode(raw if isinstance(raw, bytes) else str(raw).encode())
            except Exception:
                logger.warning("Undecodable dead letter %r in %s.", redis_id, xq_msgs)
                continue
            with session_scope() as session:
                known = session.exec(
                    select(DeadLetter).where(DeadLetter.message_id == message.message_id)
                ).first()
                if known is not None and known.status == DeadLetterStatus.DEAD:
                    continue
                parked = broker.client.hget(reasons_key, message.message_id)
                if parked is not None:
                    fields = json.loads(parked)
                    for name in ("first_failed_at", "last_failed_at"):
                        fields[name] = _from_millis(fields[name]) or utc_now()
                else:
                    dead_at = _from_millis(broker.client.zscore(xq, redis_id)) or utc_now()
                    fields = describe(message, None, now=dead_at)
                    fields["exception_message"] = (
                        "the reason was lost (the database was unreachable when the message died); "
                        "the traceback is that of its last retried failure, if any"
                    )
                fields["redis_message_id"] = redis_id.decode() if isinstance(redis_id, bytes) else redis_id
                record_dead_letter(session, **fields)
            broker.client.hdel(reasons_key, message.message_id)
            filed += 1
    return filed


def _remove_redis_copy(broker: RedisBroker, record: DeadLetter) -> None:
    if not record.redis_message_id:
        return
    xq, xq_msgs = _xq_keys(broker, record.queue_name)
    with broker.client.pipeline(transaction=True) as pipe:
        pipe.zrem(xq, record.redis_message_id)
        pipe.hdel(xq_msgs, record.redis_message_id)
        pipe.execute()


def retry(broker: RedisBroker, record_ids: Iterable[int]) -> list[DeadLetter]:
    """Send each dead message back to its queue with a fresh retry count."""
    retried = []
    for record_id in record_ids:
        with session_scope() as session:
            dead = session.get(DeadLetter, record_id)
            if dead is None or dead.status != DeadLetterStatus.DEAD:
                continue
            if (
                dead.actor_name == "deliver_email"
                and dead.message_args
                and isinstance(dead.message_args[0], dict)
            ):
                delivery_id = dead.message_args[0].get("delivery_id")
                if isinstance(delivery_id, int):
                    # Its death failed the delivery; a sent one stays sent, and
                    # the message will find it so.
                    reopen_delivery(session, delivery_id)
        # Committed before the enqueue: a worker may take the message at once.
        broker.enqueue(
            dramatiq.Message(
                queue_name=dead.queue_name,
                actor_name=dead.actor_name,
                args=tuple(dead.message_args),
                kwargs=dict(dead.message_kwargs),
                options={},
                message_id=dead.message_id,
            )
        )
        _remove_redis_copy(broker, dead)
        with session_scope() as session:
            current = session.get(DeadLetter, record_id)
            if current is not None:
                mark_retried(session, current)
                retried.append(current)
    return retried


def purge(broker: RedisBroker, record_ids: Iterable[int]) -> int:
    """Delete dead letters from SQL and from Redis; returns how many."""
    count = 0
    for record_id in record_ids:
        with session_scope() as session:
            dead = session.get(DeadLetter, record_id)
            if dead is None:
                continue
            _remove_redis_copy(broker, dead)
            session.delete(dead)
            count += 1
    return count


def redis_copy_exists(broker: RedisBroker, record: DeadLetter) -> bool:
    """Whether Dramatiq's dead-letter queue still holds this record's message."""
    if not record.redis_message_id:
        return False
    _, xq_msgs = _xq_keys(broker, record.queue_name)
    try:
        return bool(broker.client.hexists(xq_msgs, record.redis_message_id))
    except redis.RedisError:
        return False
