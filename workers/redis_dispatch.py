"""Calling the Redis broker's own Lua script directly, for what Dramatiq does one at a time.

Dramatiq's Redis broker does everything through one script (enqueue, fetch,
ack, maintenance ...). Two things here need it directly: maintenance on a
schedule rather than on a dice roll, and enqueueing many messages in one round
trip.
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis


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

    On Redis the scripts run in one ``MULTI``/``EXEC``: Redis runs all of them
    or, when the connection drops before ``EXEC``, none. On RabbitMQ, see
    ``ServiceRabbitmqBroker.enqueue_many``. On another broker, one by one.
    Middleware sees each message exactly as with ``broker.enqueue``.
    """
    from workers.rabbitmq import ServiceRabbitmqBroker

    if isinstance(broker, ServiceRabbitmqBroker):
        broker.enqueue_many(messages)
        return
    if not isinstance(broker, RedisBroker):
        for message in messages:
            broker.enqueue(message)
        return
    prepared = [message.copy(options={"redis_message_id": str(uuid4())}) for message in messages]
    for message in prepared:
        broker.emit_before("enqueue", message, None)
    script = broker.scripts["dispatch"]
    with broker.client.pipeline(transaction=True) as pipe:
        for message in prepared:
            script(
                keys=[broker.namespace],
                args=dispatch_args(
                    broker,
                    "enqueue",
                    message.queue_name,
                    message.options["redis_message_id"],
                    message.encode(),
                ),
                client=pipe,
            )
        pipe.execute()
    for message in prepared:
        broker.emit_after("enqueue", message, None)
