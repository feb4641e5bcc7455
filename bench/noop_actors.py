"""The baseline: no-op actors on Dramatiq's own Redis broker with its default middleware.

Worker processes load it with ``python -m dramatiq bench.noop_actors:broker``
(see ``bench.processes.noop_worker``). It reads the Redis URL from
``REDIS_URL`` and its namespace from ``BENCH_NOOP_NAMESPACE``: the same Redis
server as the service's benchmarks, a namespace of its own.

The benchmark process never imports this module (it would replace Dramatiq's
global broker there); it builds the same messages with ``bench.noop.noop_message``.
"""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.noop import LATENCIES_KEY, NAMESPACE_VARIABLE, QUEUE

broker = RedisBroker(  # type: ignore[no-untyped-call]
    url=os.environ["REDIS_URL"], namespace=os.environ[NAMESPACE_VARIABLE]
)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, broker=broker)
def noop() -> None:
    """Nothing: the framework's own cost per message."""


@dramatiq.actor(queue_name=QUEUE, broker=broker)
def noop_timed(sent_at: float) -> None:
    """Record how long the message took from enqueue (``sent_at``, epoch seconds) to running."""
    # Measured before the write: recording the figure is not part of it.
    latency = time.time() - sent_at
    broker.client.rpush(f"{broker.namespace}:{LATENCIES_KEY}", latency)
