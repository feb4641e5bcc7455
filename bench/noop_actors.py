"""The baseline: no-op actors on Dramatiq's own broker (Redis, or RabbitMQ) with its default middleware.

Worker processes load it with ``python -m dramatiq bench.noop_actors:broker``
(see ``bench.processes.noop_worker``). It reads the Redis URL from
``REDIS_URL`` and its namespace from ``BENCH_NOOP_NAMESPACE``: the same Redis
server as the service's benchmarks, a namespace of its own. With
``BENCH_NOOP_AMQP_URL`` set, the broker is Dramatiq's own RabbitMQ broker on
that URL instead, and Redis only keeps the latencies.

The benchmark process never imports this module (it would replace Dramatiq's
global broker there); it builds the same messages with ``bench.noop.noop_message``.
"""

from __future__ import annotations

import os
import time

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from bench.noop import AMQP_URL_VARIABLE, LATENCIES_KEY, NAMESPACE_VARIABLE, QUEUE

_namespace = os.environ[NAMESPACE_VARIABLE]
_amqp_url = os.environ.get(AMQP_URL_VARIABLE)
broker: dramatiq.Broker = (
    RabbitmqBroker(url=_amqp_url)
    if _amqp_url
    else RedisBroker(url=os.environ["REDIS_URL"], namespace=_namespace)  # type: ignore[no-untyped-call]
)
dramatiq.set_broker(broker)
#: Where ``noop_timed`` writes (the latency run only, not the throughput run).
_latencies = redis.Redis.from_url(os.environ["REDIS_URL"])


@dramatiq.actor(queue_name=QUEUE, broker=broker)
def noop() -> None:
    """Nothing: the framework's own cost per message."""


@dramatiq.actor(queue_name=QUEUE, broker=broker)
def noop_timed(sent_at: float) -> None:
    """Record how long the message took from enqueue (``sent_at``, epoch seconds) to running."""
    # Measured before the write: recording the figure is not part of it.
    latency = time.time() - sent_at
    _latencies.rpush(f"{_namespace}:{LATENCIES_KEY}", latency)
