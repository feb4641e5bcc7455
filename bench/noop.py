"""What the benchmark process needs of the no-op baseline, without loading its actors.

Importing ``bench.noop_actors`` replaces Dramatiq's global broker, which only
its worker processes may do; the names and messages they share live here.
"""

from __future__ import annotations

import dramatiq

#: The environment variable holding the baseline's Redis namespace.
NAMESPACE_VARIABLE = "BENCH_NOOP_NAMESPACE"

#: The environment variable that puts the baseline on RabbitMQ (its AMQP URL).
AMQP_URL_VARIABLE = "BENCH_NOOP_AMQP_URL"

#: The queue both no-op actors consume.
QUEUE = "bench_noop"

#: The list ``noop_timed`` appends its latencies to (under the namespace), in seconds.
LATENCIES_KEY = "bench_noop_latencies"


def noop_message(actor_name: str, *args: object) -> dramatiq.Message[None]:
    """A message for one of the no-op actors (``noop`` or ``noop_timed``)."""
    return dramatiq.Message(queue_name=QUEUE, actor_name=actor_name, args=args, kwargs={}, options={})
