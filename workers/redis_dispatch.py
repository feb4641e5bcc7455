"""Calling the Redis broker's own Lua script directly, for what Dramatiq does one at a time.

Dramatiq's Redis broker does everything through one script (enqueue, fetch,
ack, maintenance ...). Two things here need it directly: maintenance on a
schedule rather than on a dice roll, and enqueueing many messages in one round
trip.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any
from uuid import uuid4

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.broker_errors import BatchMaybeQueued


def dispatch_args(
    broker: RedisBroker, command: str, queue_name: str, *args: Any, maintenance: bool = False
) -> list[Any]:
    """The script's arguments, in the order its ``dispatch.lua`` reads them."""
    return [
        command,
        current_millis(),
        queue_name,
        broker.broker_id,
        broker.heartbeat_timeout,
        broker.dead_message_ttl,
        int(maintenance),
        # Half of Lua's stack, discovered once per process by the broker itself.
        broker._max_unpack_size(),  # type: ignore[no-untyped-call]
        *args,
    ]


def run_maintenance(broker: RedisBroker, queue_name: str) -> None:
    """Run Dramatiq's own maintenance for one queue now.

    With its maintenance flag set, the script moves the unacked messages of
    workers whose heartbeat is older than the timeout back to the queue, and
    drops expired dead letters. "qsize" is the command because it only reads;
    the call also records this worker's heartbeat.
    """
    broker.scripts["dispatch"](
        keys=[broker.namespace], args=dispatch_args(broker, "qsize", queue_name, maintenance=True)
    )


def enqueue_many(broker: dramatiq.Broker, messages: list[dramatiq.Message[Any]]) -> None:
    """Enqueue messages in one round trip to the broker: all of them, or none.

    On Redis the scripts run in one ``MULTI``/``EXEC`` (see ``_enqueue_batch``).
    On RabbitMQ, see ``ServiceRabbitmqBroker.enqueue_many``. On another broker,
    one by one. Middleware sees each message exactly as with ``broker.enqueue``.
    Raises ``BatchMaybeQueued`` when no attempt got through and one may have
    queued the batch; any other broker error means none of it was queued.
    """
    from workers.rabbitmq import ServiceRabbitmqBroker

    if isinstance(broker, ServiceRabbitmqBroker):
        broker.enqueue_many(messages)
        return
    if not isinstance(broker, RedisBroker):
        for message in messages:
            broker.enqueue(message)
        return
    if not messages:
        return
    prepared = [message.copy(options={"redis_message_id": str(uuid4())}) for message in messages]
    for message in prepared:
        broker.emit_before("enqueue", message, None)
    _enqueue_batch(broker, prepared)
    for message in prepared:
        broker.emit_after("enqueue", message, None)


def _enqueue_batch(broker: RedisBroker, messages: list[dramatiq.Message[Any]]) -> None:
    """The dispatch script's ``enqueue`` of each message in one ``MULTI``/``EXEC``; never twice.

    Redis runs a ``MULTI``/``EXEC`` block whole, or not at all when the
    connection drops before ``EXEC`` arrives. What it cannot say is whether a
    block whose answer was lost ran: redis-py's own retry would send it again
    (the batch queued twice), and after its last try nothing would tell. So each
    attempt sends the block once, on a connection of its own with no retry,
    under the broker client's retry policy (a worker's waits out an outage; a
    producer's gives up after a few seconds), and an attempt that follows one
    whose block was sent first asks Redis whether the batch is there: its first
    message's body, by its id (had a worker already taken and finished that
    message in the meantime, the batch would be sent again: the actors are
    idempotent). ``BatchMaybeQueued`` when none got through and a block was sent.
    """
    client = _single_shot(broker.client)
    script = broker.scripts["dispatch"]
    first = messages[0]
    first_key = f"{broker.namespace}:{first.queue_name}.msgs"
    commands: list[tuple[Any, ...]] = [
        (
            "EVALSHA",
            script.sha,
            1,
            broker.namespace,
            *dispatch_args(
                broker, "enqueue", message.queue_name, message.options["redis_message_id"], message.encode()
            ),
        )
        for message in messages
    ]
    sent = False

    def attempt() -> None:
        nonlocal sent
        if sent and client.hexists(first_key, first.options["redis_message_id"]):
            # The block sent by an earlier attempt ran; only its answer was lost.
            return
        # Loaded first: inside MULTI a missing script would fail every message.
        client.script_load(script.script)
        connection = client.connection_pool.get_connection()
        try:
            block = connection.pack_commands([("MULTI",), *commands, ("EXEC",)])  # type: ignore[no-untyped-call]
            connection.send_packed_command(block)  # type: ignore[no-untyped-call]
            sent = True
            for _ in range(len(commands) + 1):
                # "OK" for MULTI, "QUEUED" for each script call.
                connection.read_response()
            results = connection.read_response()
        except BaseException:
            # Its answers are left unread: the connection cannot be used again.
            connection.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            client.connection_pool.release(connection)
        for result in results or ():
            if isinstance(result, redis.ResponseError):
                raise result

    policy = broker.client.get_retry() or Retry(NoBackoff(), 0)
    try:
        policy.call_with_retry(attempt, lambda error: None)
    except (redis.ConnectionError, redis.TimeoutError) as error:
        if sent:
            raise BatchMaybeQueued(error) from error  # type: ignore[no-untyped-call]
        raise


#: Per broker client, a client of the same server whose commands are never retried.
_single_shot_clients: weakref.WeakKeyDictionary[redis.Redis, redis.Redis] = weakref.WeakKeyDictionary()
_single_shot_lock = threading.Lock()


def _single_shot(client: redis.Redis) -> redis.Redis:
    """A client of ``client``'s server whose commands are tried once (see ``_enqueue_batch``)."""
    with _single_shot_lock:
        found = _single_shot_clients.get(client)
        if found is None:
            pool = client.connection_pool
            found = redis.Redis(
                connection_pool=redis.ConnectionPool(
                    connection_class=pool.connection_class,
                    **{**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)},
                )
            )
            _single_shot_clients[client] = found
        return found
