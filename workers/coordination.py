"""The Redis that coordinates the service, whichever broker carries its messages.

With a Redis broker it is the broker's own client and namespace. With RabbitMQ
(``BROKER_URL=amqp://…``) messages travel through RabbitMQ, but a few things
still need one shared Redis (``REDIS_URL``): each scheduler claims its job's
slot there (``SET NX``) so two schedulers never enqueue the same run, and a
dead letter's reason waits there while the database is unreachable.
"""

from __future__ import annotations

from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker


def coordination_client(broker: dramatiq.Broker) -> redis.Redis | None:
    """The coordinating Redis client of ``broker``, or None when it has none (a stub broker)."""
    if isinstance(broker, RedisBroker):
        client: redis.Redis = broker.client
        return client
    coordination: Any = getattr(broker, "coordination", None)
    return coordination if isinstance(coordination, redis.Redis) else None


def coordination_namespace(broker: dramatiq.Broker) -> str:
    """The prefix of the coordination keys (``REDIS_NAMESPACE``)."""
    return str(getattr(broker, "namespace", "dramatiq"))
