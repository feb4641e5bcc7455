"""Dead-letter operations: record, list, retry and purge, with Redis kept consistent.

A message that fails for good sits in Dramatiq's Redis dead-letter queue
(``{namespace}:{queue}.XQ``, a sorted set, and ``.XQ.msgs``, a hash, both keyed
by the Redis message id) and, with its reason, in the ``dead_letters`` table. SQL
is the record operators work from; retrying or purging removes the Redis copy
too. When SQL cannot be written at the moment a message dies, the reason waits
in Redis (``{namespace}:__dead_letter_reasons__``) and ``sync`` files it later.

Dramatiq moves a failed message to its dead-letter queue (the nack) before the
hook that files its reason runs, so a worker killed between the two would leave
the message dead and its reason unknown. The reason is therefore held in Redis
(``{namespace}:__dead_letter_holds__``) from just before the nack until it is
filed; ``sync`` files a held reason whose message sits in a dead-letter queue, and
drops one whose message never got there (the worker died before its nack, and
the broker delivers the message again).
"""

from __future__ import annotations

import json
import logging
import time
import traceback as traceback_module
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from dramatiq.errors import DecodeError
from sqlalchemy.exc import OperationalError
from sqlmodel import select

from models.dead_letter import DeadLetter, DeadLetterStatus, mark_retried, record_dead_letter
from models.delivery import EmailDelivery, record_attempt_error, reopen_delivery, undo_reopen
from models.errors import DeliveryGroupMismatch, UnknownDelivery
from models.messages import contract_id_of, delivery_ids_of
from models.text import utf8_text
from models.types import utc_now
from workers.coordination import coordination_client, coordination_namespace
from workers.database import session_scope
from workers.ops.metrics import count_email
from workers.retry_policy import underlying

logger = logging.getLogger(__name__)

#: How long recording a dead letter keeps retrying a failing database, in seconds.
RECORD_PATIENCE_SECONDS = 10.0

#: The exception type of a dead letter filed without its exception.
UNKNOWN_EXCEPTION_TYPE = "Unknown"

#: The message of a dead letter that ``sync`` found in Redis alone, its reason never filed.
LOST_REASON = (
    "the reason was lost (the database was unreachable when the message died); "
    "the traceback is that of its last retried failure, if any"
)

#: A held reason older than this, in milliseconds, whose message is in no
#: dead-letter queue is dropped: its worker died before the nack, so the message
#: was delivered again. The filing hook runs within milliseconds of the nack.
HOLD_GRACE_MS = 60_000

#: Options a message carries from one attempt to the next (see DeadLetters middleware).
ATTEMPTS_OPTION = "attempts"
FIRST_FAILED_OPTION = "first_failed_at"

#: Longest message id (the ``dead_letters.message_id`` column; Dramatiq's are UUIDs).
MESSAGE_ID_MAX_LENGTH = 64

#: The actor recorded for a message that is not a well-formed Dramatiq message (it
#: cannot be retried: there is nothing to send again).
MALFORMED_ACTOR = "(malformed)"


def canonical_queue(queue_name: str) -> str:
    """``emails.DQ`` and ``emails`` share one dead-letter queue: ``emails``."""
    return queue_name.removesuffix(".DQ")


def _reasons_key(broker: dramatiq.Broker) -> str:
    return f"{coordination_namespace(broker)}:__dead_letter_reasons__"


def _holds_key(broker: dramatiq.Broker) -> str:
    return f"{coordination_namespace(broker)}:__dead_letter_holds__"


def _park(fields: dict[str, Any]) -> str:
    """The fields as JSON for Redis, their times in milliseconds."""
    return json.dumps(
        {k: (v.timestamp() * 1000 if isinstance(v, datetime) else v) for k, v in fields.items()},
        default=str,
    )


def _unpark(raw: str | bytes) -> dict[str, Any]:
    """The fields ``_park`` wrote, their times as datetimes again."""
    fields: dict[str, Any] = json.loads(raw)
    for name in ("first_failed_at", "last_failed_at"):
        fields[name] = _from_millis(fields[name]) or utc_now()
    return fields


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
    exception = underlying(exception)
    options = dict(message.options)
    args = list(message.args) if isinstance(message.args, list | tuple) else [message.args]
    if exception is not None:
        exception_type = type(exception).__name__
        exception_message = str(exception)
        trace: str | None = "".join(traceback_module.format_exception(exception))
    else:
        exception_type = UNKNOWN_EXCEPTION_TYPE
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


def envelope_problem(
    message: dramatiq.Message[Any],
    queue_names: Iterable[str],
    *,
    redis_id: bool = True,
    fetched_at_ms: int | None = None,
) -> str | None:
    """What makes a decoded message unprocessable whatever its payload, or None.

    Dramatiq trusts these fields: a foreign ``queue_name`` kills the worker thread
    that finishes the message, and on Redis (``redis_id``) a message without its
    Redis id can never be acknowledged nor dead-lettered (RabbitMQ acknowledges by
    delivery tag). ``fetched_at_ms``: the message was just fetched from
    ``queue_names[0]``, whose delay it must not claim (see ``eta_problem``).
    """
    # Decoded from JSON written by anyone: the fields' declared types are not checked.
    fields: Any = message
    if not isinstance(fields.message_id, str):
        return "message_id is not a string"
    if len(fields.message_id) > MESSAGE_ID_MAX_LENGTH or not fields.message_id.isprintable():
        # Its dead letter could not be filed under it (the column's length; NUL).
        return f"message_id is longer than {MESSAGE_ID_MAX_LENGTH} characters or holds control characters"
    if not isinstance(fields.actor_name, str):
        return "actor_name is not a string"
    if utf8_text(fields.actor_name) != fields.actor_name:
        # A lone surrogate (JSON's "\ud800"): Dramatiq's own error for an unknown
        # actor would carry it into the logs, which cannot encode it.
        return "actor_name holds a character that is not text (a lone surrogate)"
    if not isinstance(fields.options, dict):
        return "options is not an object"
    if redis_id and not isinstance(fields.options.get("redis_message_id"), str):
        return "options.redis_message_id is missing"
    if not isinstance(fields.kwargs, dict):
        return "kwargs is not an object"
    if not all(isinstance(key, str) and utf8_text(key) == key for key in fields.kwargs):
        return "kwargs has a key that is not text (a lone surrogate)"
    queues = tuple(queue_names)
    if fields.queue_name not in queues:
        return f"its queue_name {str(fields.queue_name)[:64]!r} is not the queue it was on"
    timestamp = fields.message_timestamp
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp < 0:
        # Dramatiq's age limit subtracts it from the clock (a CRITICAL traceback, the limit ignored).
        return "message_timestamp is not a whole number of milliseconds"
    problem = options_problem(fields.options)
    if problem is None and fetched_at_ms is not None:
        problem = eta_problem(fields.options.get("eta"), queues[0], now_ms=fetched_at_ms)
    return problem


#: How far in the future an ``eta`` may be on a queue that is not a delay queue, in
#: milliseconds: Dramatiq moves a delayed message there once due by its host's clock,
#: and another host's clock may be behind.
ETA_CLOCK_SKEW_MS = 60_000


def eta_problem(eta: int | None, queue_name: str, *, now_ms: int) -> str | None:
    """Why a message fetched from ``queue_name`` may not carry this ``eta``, or None.

    A worker holds a message whose eta is still ahead in memory, counted against
    the queue's prefetch: a few such messages on ``contracts`` would stop it for
    as long as their delay. Delays go through the delay queue (``contracts.DQ``),
    which Dramatiq reads apart.
    """
    if eta is None or queue_name.endswith(".DQ") or eta <= now_ms + ETA_CLOCK_SKEW_MS:
        return None
    return (
        f"options.eta is {(eta - now_ms) // 1000} s ahead on {queue_name}: a delayed message goes "
        f"to {queue_name}.DQ (a worker would hold this one, blocking the queue)"
    )


#: Options that name code to run (callbacks, pipelines, exception classes). Only a
#: Python producer can set them meaningfully, and this service never does; from a
#: raw message, a bad one raises inside Dramatiq's error handling, which kills the
#: worker thread and acknowledges the message as if it had succeeded.
FORBIDDEN_OPTIONS = ("throws", "retry_when", "on_success", "on_failure", "on_retry_exhausted", "pipe_target")

#: Options Dramatiq and the middleware compute with: whole numbers (counts and
#: milliseconds), not negative. ``None`` stands for unset.
INTEGER_OPTIONS = (
    "retries",
    "max_retries",
    "min_backoff",
    "max_backoff",
    "max_age",
    "time_limit",
    "eta",
    "requeue_timestamp",
    ATTEMPTS_OPTION,
    FIRST_FAILED_OPTION,
)


def options_problem(options: dict[str, Any]) -> str | None:
    """Why a message's Dramatiq options cannot be processed safely, or None."""
    for name in FORBIDDEN_OPTIONS:
        if name in options:
            return f"options.{name} is set (producers may not set callbacks or exception options)"
    for name in INTEGER_OPTIONS:
        value = options.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"options.{name} is not a whole number of at least 0"
    return None


def describe_malformed(
    redis_message_id: str, queue_name: str, *, exception_type: str, reason: str, now: datetime
) -> dict[str, Any]:
    """The dead-letter fields of a message that is not a well-formed Dramatiq message.

    Its id is the Redis one (its own cannot be trusted), and its body stays only
    in Redis's dead-letter queue: it may hold anything.
    """
    return {
        "message_id": redis_message_id,
        "redis_message_id": redis_message_id,
        "queue_name": canonical_queue(queue_name),
        "actor_name": MALFORMED_ACTOR,
        "contract_id": None,
        "message_args": [],
        "message_kwargs": {},
        "exception_type": exception_type,
        "exception_message": reason,
        "traceback": None,
        "attempts": 1,
        "first_failed_at": now,
        "last_failed_at": now,
    }


def decode_problem(raw: bytes, cause: BaseException | None) -> str:
    """Why a body is not a Dramatiq message, without quoting the body."""
    # Dramatiq's decode errors quote the body: name the innermost cause instead.
    while isinstance(cause, DecodeError):
        cause = cause.error
    reason = f"{type(cause).__name__}: {cause}" if cause is not None else "unknown"
    return f"the body ({len(raw)} bytes) is not a Dramatiq message: {reason}"


def dead_letter_malformed(
    broker: RedisBroker, queue_name: str, raw: bytes, *, exception_type: str, reason: str
) -> None:
    """Move a malformed message this worker fetched to the dead-letter queue, and record it.

    Dramatiq's consumer only gets the bodies it fetched, so the message is found
    by its body among this worker's unacknowledged messages of the queue.
    """
    acks = f"{broker.namespace}:__acks__.{broker.broker_id}.{queue_name}"
    messages = f"{broker.namespace}:{queue_name}.msgs"
    for member in broker.client.smembers(acks):
        if broker.client.hget(messages, member) != raw:
            continue
        redis_id = member.decode() if isinstance(member, bytes) else str(member)
        broker.do_nack(queue_name, redis_id)
        logger.error("Message %s on %s is malformed (%s): dead-lettered.", redis_id, queue_name, reason)
        fields = describe_malformed(
            redis_id, queue_name, exception_type=exception_type, reason=reason, now=utc_now()
        )
        record(broker, fields)
        return
    logger.error("A malformed message on %s could not be found among the fetched ones.", queue_name)


#: The deaths of messages that named deliveries not theirs: those are not failed.
_NOT_THEIRS = frozenset({UnknownDelivery.__name__, DeliveryGroupMismatch.__name__})


def _fail_filed(fields: dict[str, Any]) -> None:
    """Fail the still-pending deliveries a filed dead letter's message named, and count them.

    Called once the record is filed (now, or later by sync when the database was
    down): left pending, the sweep's re-drive would send them while the record
    reads dead. Only those this call made failed are counted: a permanent error
    already failed its delivery (and counted it) when it happened.
    """
    args = fields.get("message_args") or [None]
    delivery_ids = delivery_ids_of(str(fields.get("actor_name")), args[0])
    if not delivery_ids or fields.get("exception_type") in _NOT_THEIRS:
        return
    reason = f"{fields.get('exception_type')}: {fields.get('exception_message', '')}"
    failed: dict[str, int] = {}
    with session_scope() as session:
        now = utc_now()
        for delivery_id in delivery_ids:
            if record_attempt_error(session, delivery_id, error=reason, now=now, permanent=True):
                delivery = session.get(EmailDelivery, delivery_id)
                if delivery is not None:
                    failed[delivery.kind] = failed.get(delivery.kind, 0) + 1
    for kind, amount in failed.items():
        count_email(kind, "failed", amount)


def record(broker: dramatiq.Broker, fields: dict[str, Any]) -> None:
    """File a dead letter in SQL; if the database stays down, park the reason in Redis."""
    deadline = time.monotonic() + RECORD_PATIENCE_SECONDS
    pause = 0.2
    while True:
        try:
            with session_scope() as session:
                record_dead_letter(session, **fields)
            # Here rather than in a hook of its own: this waits out a database
            # outage, and a reason filed later by sync fails them then.
            _fail_filed(fields)
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
    client = coordination_client(broker)
    if client is None:
        logger.error("Dead message %s: no Redis to park its reason in; it is lost.", fields["message_id"])
        return
    client.hset(_reasons_key(broker), fields["message_id"], _park(fields))


def hold(broker: dramatiq.Broker, fields: dict[str, Any]) -> None:
    """Keep a dying message's reason in Redis until ``release``: called before the nack."""
    client = coordination_client(broker)
    if client is not None:
        held = json.dumps({"held_at": current_millis(), "fields": _park(fields)})
        client.hset(_holds_key(broker), fields["message_id"], held)


def release(broker: dramatiq.Broker, message_id: str) -> None:
    """Forget a held reason: it has been filed (or parked by ``record``)."""
    client = coordination_client(broker)
    if client is not None:
        client.hdel(_holds_key(broker), message_id)


def _held(client: redis.Redis, key: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """Every held reason: message id -> (when it was held, in epoch milliseconds; its fields)."""
    held = {}
    for message_id, raw in client.hgetall(key).items():
        entry = json.loads(raw)
        name = message_id.decode() if isinstance(message_id, bytes) else str(message_id)
        held[name] = (int(entry["held_at"]), _unpark(entry["fields"]))
    return held


def _stale(held: dict[str, tuple[int, dict[str, Any]]]) -> list[str]:
    """The held reasons older than ``HOLD_GRACE_MS``."""
    cutoff = current_millis() - HOLD_GRACE_MS
    return [message_id for message_id, (held_at, _) in held.items() if held_at < cutoff]


def sync(broker: dramatiq.Broker, queues: Iterable[str]) -> int:
    """File every Redis dead letter that SQL does not know yet; returns how many were filed."""
    if not isinstance(broker, RedisBroker):
        return _sync_parked(broker)
    filed = 0
    reasons_key, holds_key = _reasons_key(broker), _holds_key(broker)
    held = _held(broker.client, holds_key)
    dead_ids = set()
    for queue in {canonical_queue(q) for q in queues}:
        xq, xq_msgs = _xq_keys(broker, queue)
        for redis_id, raw in broker.client.hgetall(xq_msgs).items():
            body = raw if isinstance(raw, bytes) else str(raw).encode()
            try:
                message = dramatiq.Message.decode(body)
            except Exception as exc:
                filed += _sync_malformed(broker, queue, redis_id, "DecodeError", decode_problem(body, exc))
                continue
            problem = envelope_problem(message, (queue, f"{queue}.DQ"))
            if problem is not None:
                filed += _sync_malformed(broker, queue, redis_id, "MalformedMessage", problem)
                continue
            dead_ids.add(message.message_id)
            try:
                with session_scope() as session:
                    known = session.exec(
                        select(DeadLetter).where(DeadLetter.message_id == message.message_id)
                    ).first()
                    if known is not None and known.status == DeadLetterStatus.DEAD:
                        continue
                    parked = broker.client.hget(reasons_key, message.message_id)
                    if parked is not None:
                        fields = _unpark(parked)
                    elif message.message_id in held:
                        fields = held[message.message_id][1]
                    else:
                        dead_at = _from_millis(broker.client.zscore(xq, redis_id)) or utc_now()
                        fields = describe(message, None, now=dead_at)
                        fields["exception_message"] = LOST_REASON
                    fields["redis_message_id"] = (
                        redis_id.decode() if isinstance(redis_id, bytes) else redis_id
                    )
                    # Without the reason its worker wrote, that worker may be recording
                    # it right now: never overwrite it with a guess.
                    knows_reason = parked is not None or message.message_id in held
                    record_dead_letter(session, overwrite=knows_reason or known is not None, **fields)
                _fail_filed(fields)
                broker.client.hdel(reasons_key, message.message_id)
            except OperationalError:
                raise  # the database: nothing can be filed now
            except Exception:
                # One message that cannot be filed must not keep the others from it.
                logger.exception("Dead message %s on %s could not be filed.", message.message_id, queue)
                continue
            filed += 1
    # Filed now or before; or, past the grace, never nacked: either way done with.
    finished = {message_id for message_id in held if message_id in dead_ids}.union(_stale(held))
    if finished:
        broker.client.hdel(holds_key, *finished)
    return filed


def _sync_parked(broker: dramatiq.Broker) -> int:
    """File the reasons parked in Redis (RabbitMQ: the parked fields are the whole record)."""
    client = coordination_client(broker)
    if client is None:
        return 0
    key = _reasons_key(broker)
    filed = 0
    for message_id, raw in client.hgetall(key).items():
        fields = _unpark(raw)
        with session_scope() as session:
            record_dead_letter(session, **fields)
        _fail_filed(fields)
        client.hdel(key, message_id)
        filed += 1
    return filed + _sync_held_on_rabbitmq(broker, client)


def _sync_held_on_rabbitmq(broker: dramatiq.Broker, client: redis.Redis) -> int:
    """File the stale held reasons whose message is in its ``.XQ``; drop the others."""
    from workers.rabbitmq import ServiceRabbitmqBroker, dead_copies

    key = _holds_key(broker)
    held = _held(client, key)
    stale = _stale(held)
    if not stale or not isinstance(broker, ServiceRabbitmqBroker):
        return 0
    by_queue: dict[str, list[str]] = {}
    for message_id in stale:
        by_queue.setdefault(held[message_id][1]["queue_name"], []).append(message_id)
    filed = 0
    for queue, message_ids in by_queue.items():
        for message_id in dead_copies(broker, queue, message_ids):
            with session_scope() as session:
                # The worker may have filed it and died before releasing the hold.
                record_dead_letter(session, overwrite=False, **held[message_id][1])
            _fail_filed(held[message_id][1])
            filed += 1
    client.hdel(key, *stale)
    return filed


def _sync_malformed(broker: RedisBroker, queue: str, redis_id: Any, exception_type: str, reason: str) -> int:
    redis_id = redis_id.decode() if isinstance(redis_id, bytes) else str(redis_id)
    with session_scope() as session:
        known = session.exec(select(DeadLetter).where(DeadLetter.message_id == redis_id)).first()
        if known is not None and known.status == DeadLetterStatus.DEAD:
            return 0
        xq, _ = _xq_keys(broker, queue)
        dead_at = _from_millis(broker.client.zscore(xq, redis_id)) or utc_now()
        fields = describe_malformed(
            redis_id, queue, exception_type=exception_type, reason=reason, now=dead_at
        )
        record_dead_letter(session, overwrite=known is not None, **fields)
    broker.client.hdel(_reasons_key(broker), redis_id)
    return 1


def _remove_redis_copy(broker: dramatiq.Broker, record: DeadLetter) -> None:
    if not isinstance(broker, RedisBroker):
        # RabbitMQ: its copies are found by message id (see workers.rabbitmq).
        from workers.rabbitmq import ServiceRabbitmqBroker, remove_dead_copies

        if isinstance(broker, ServiceRabbitmqBroker):
            remove_dead_copies(broker, canonical_queue(record.queue_name), [record.message_id])
        return
    if not record.redis_message_id:
        return
    xq, xq_msgs = _xq_keys(broker, record.queue_name)
    with broker.client.pipeline(transaction=True) as pipe:
        pipe.zrem(xq, record.redis_message_id)
        pipe.hdel(xq_msgs, record.redis_message_id)
        pipe.execute()


def _counted(record_ids: Iterable[int], on_each: Callable[[int], None] | None) -> Iterator[int]:
    """The ids; after the loop's body for each (``continue`` included), ``on_each(done so far)``."""
    for done, record_id in enumerate(record_ids, start=1):
        yield record_id
        if on_each is not None:
            on_each(done)


def retry(
    broker: dramatiq.Broker,
    record_ids: Iterable[int],
    *,
    on_each: Callable[[int], None] | None = None,
) -> list[DeadLetter]:
    """Send each dead message back to its queue with a fresh retry count.

    ``on_each`` is called with how many records were handled so far, after each.
    """
    retried = []
    for record_id in _counted(record_ids, on_each):
        with session_scope() as session:
            dead = session.get(DeadLetter, record_id)
            if dead is None or dead.status != DeadLetterStatus.DEAD:
                continue
            if dead.actor_name == MALFORMED_ACTOR:
                # Nothing to send again; its body stays in Redis for whoever wrote it.
                logger.warning("Dead letter %s is not a Dramatiq message and cannot be retried.", record_id)
                continue
            named = dead.message_args[0] if dead.message_args else None
            # Its death failed the delivery; a sent one stays sent, and the
            # message will find it so.
            reopened = [
                delivery_id
                for delivery_id in delivery_ids_of(dead.actor_name, named)
                if reopen_delivery(session, delivery_id)
            ]
        try:
            if not isinstance(broker, RedisBroker):
                # RabbitMQ finds copies by message id, which the retried message keeps:
                # removed first, so a copy from a new death is never taken for the old one.
                _remove_redis_copy(broker, dead)
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
        except BaseException:
            # Not retried: the emails go back to failed, as their dead letter says.
            with session_scope() as session:
                for delivery_id in reopened:
                    undo_reopen(session, delivery_id)
            raise
        if isinstance(broker, RedisBroker):
            _remove_redis_copy(broker, dead)
        with session_scope() as session:
            current = session.get(DeadLetter, record_id, with_for_update=True)
            if current is None:
                continue
            if current.last_failed_at != dead.last_failed_at:
                # A worker took the message at once and it died again: that new
                # death (and its new Redis copy) is what the record must show.
                current.retry_count += 1
                current.retried_at = utc_now()
                session.add(current)
            else:
                mark_retried(session, current)
            retried.append(current)
    return retried


def purge(
    broker: dramatiq.Broker,
    record_ids: Iterable[int],
    *,
    on_each: Callable[[int], None] | None = None,
) -> int:
    """Delete dead letters from SQL and from Redis; returns how many.

    ``on_each`` is called with how many records were handled so far, after each.
    """
    count = 0
    for record_id in _counted(record_ids, on_each):
        with session_scope() as session:
            dead = session.get(DeadLetter, record_id)
            if dead is None:
                continue
            _remove_redis_copy(broker, dead)
            session.delete(dead)
            count += 1
    return count


def redis_copy_exists(broker: dramatiq.Broker, record: DeadLetter) -> bool:
    """Whether Dramatiq's dead-letter queue still holds this record's message (False on RabbitMQ)."""
    if not isinstance(broker, RedisBroker) or not record.redis_message_id:
        return False
    _, xq_msgs = _xq_keys(broker, record.queue_name)
    try:
        return bool(broker.client.hexists(xq_msgs, record.redis_message_id))
    except redis.RedisError:
        return False
