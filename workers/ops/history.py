"""The last hour of queue depth and throughput, kept in Redis for ``status --html``'s chart.

Workers record it, cheaply and without ever failing a message:

- **Throughput.** ``MessageLog`` counts each processed message in memory
  (a lock and a dict increment: no Redis call per message). Each worker process
  adds its counts to Redis on its maintenance tick, one ``MULTI`` of
  ``HINCRBY`` per minute touched, into ``{ns}:__stats__:processed:{minute}``
  (``minute``: the minute's start in epoch seconds; field ``{queue}:{outcome}``,
  outcomes as in the message log: done, retry, failed, skipped). Each key
  expires ``RETENTION`` after its minute.
- **Depth.** On each maintenance tick a worker tries to claim the sample slot
  (``SET {ns}:__stats__:depth_claim NX PX interval``); the one that gets it
  reads every queue's ready, delayed, in-flight and dead counts and adds them to
  the sorted set ``{ns}:__stats__:depth`` (score: the time in milliseconds),
  trimmed to ``RETENTION``: one Lua script, so however many workers run there
  is one sample per interval (``HISTORY_SAMPLE_INTERVAL_MS``). On RabbitMQ the
  worker that claims the slot reads the counts from RabbitMQ (a passive declare
  per queue, as ``status`` does) and stores them the same way, in flight
  ``null``: plain AMQP does not count it.

A write that fails is logged and dropped (counts survive a connection error
until the next tick); it never stops maintenance or a message. Reading the
history (``read_history``) only reads.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name

from workers.ops.snapshot import BROKER_READ_TIMEOUT_SECONDS, QUEUE_STATES, QUEUES

logger = logging.getLogger(__name__)

#: How long history is kept in Redis, in seconds (the chart shows the last hour).
RETENTION_SECONDS = 2 * 3600

#: The span the chart shows.
CHART_SPAN = timedelta(hours=1)


def stats_prefix(namespace: str) -> str:
    return f"{namespace}:__stats__"


def processed_key(namespace: str, minute: int) -> str:
    """The hash of messages processed during the minute starting at ``minute`` (epoch seconds)."""
    return f"{stats_prefix(namespace)}:processed:{minute}"


def depth_key(namespace: str) -> str:
    """The sorted set of depth samples (score: epoch milliseconds)."""
    return f"{stats_prefix(namespace)}:depth"


# -- recording (workers) -------------------------------------------------------


class ThroughputCounter:
    """Messages processed by this process, per minute, queue and outcome, not yet in Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[int, str, str]] = Counter()

    def add(self, queue_name: str, outcome: str, *, at: float | None = None) -> None:
        """Count one message (``at``: epoch seconds, now by default). Never touches Redis."""
        minute = int((time.time() if at is None else at) // 60 * 60)
        with self._lock:
            self._counts[(minute, q_name(queue_name), outcome)] += 1

    def pending(self) -> dict[tuple[int, str, str], int]:
        with self._lock:
            return dict(self._counts)

    def flush(self, client: Any, namespace: str) -> int:
        """Add the counts to Redis; returns how many messages they covered.

        After a connection error the counts are kept for the next flush (the
        transaction may or may not have run: a rare double count beats losing
        an outage's worth of figures); after any other error they are dropped.
        """
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if not counts:
            return 0
        try:
            with client.pipeline(transaction=True) as pipe:
                for (minute, queue, outcome), count in sorted(counts.items()):
                    key = processed_key(namespace, minute)
                    pipe.hincrby(key, f"{queue}:{outcome}", count)
                    pipe.expireat(key, minute + 60 + RETENTION_SECONDS)
                pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            oldest = int(time.time()) - RETENTION_SECONDS
            with self._lock:
                self._counts.update({key: n for key, n in counts.items() if key[0] >= oldest})
            raise
        return sum(counts.values())


@functools.cache
def _sample_script() -> str:
    return Path(__file__).with_name("history_sample.lua").read_text()


def sample_depth(
    client: Any,
    namespace: str,
    *,
    interval_ms: int,
    now_ms: int | None = None,
    queues: tuple[str, ...] = QUEUES,
) -> bool:
    """Store one depth sample unless another worker stored one less than ``interval_ms`` ago."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    stored = client.eval(
        _sample_script(), 1, namespace, now_ms, interval_ms, RETENTION_SECONDS * 1000, *queues
    )
    return bool(stored)


def claim_sample_slot(client: Any, namespace: str, *, interval_ms: int, now_ms: int) -> bool:
    """Whether this caller takes the depth sample of the interval starting now (at most one does)."""
    return bool(client.set(f"{stats_prefix(namespace)}:depth_claim", now_ms, nx=True, px=interval_ms))


def store_depth_sample(
    client: Any, namespace: str, queues: dict[str, list[int | None]], *, now_ms: int
) -> None:
    """Add one sample, ``{queue: [ready, delayed, in_flight, dead]}``, as the Lua script on Redis does."""
    key, retention_ms = depth_key(namespace), RETENTION_SECONDS * 1000
    with client.pipeline(transaction=True) as pipe:
        pipe.zadd(key, {json.dumps({"t": now_ms, "q": queues}): now_ms})
        pipe.zremrangebyscore(key, "-inf", now_ms - retention_ms)
        pipe.pexpire(key, retention_ms)
        pipe.execute()


def sample_rabbitmq_depth(
    client: Any,
    namespace: str,
    amqp_url: str,
    *,
    interval_ms: int,
    timeout: float = BROKER_READ_TIMEOUT_SECONDS,
) -> bool:
    """``sample_depth`` on RabbitMQ: RabbitMQ's counts stored in Redis (``client``), in flight unknown.

    Only the worker that claims the interval reads RabbitMQ, over a connection of
    its own that gives up after ``timeout`` seconds.
    """
    from workers.ops.rabbitmq_queues import rabbitmq_figures

    now_ms = int(time.time() * 1000)
    if not claim_sample_slot(client, namespace, interval_ms=interval_ms, now_ms=now_ms):
        return False
    figures = rabbitmq_figures(amqp_url, timeout=timeout)
    store_depth_sample(
        client,
        namespace,
        {queue.name: [getattr(queue, state) for state in QUEUE_STATES] for queue in figures},
        now_ms=now_ms,
    )
    return True


def flush_counts(broker: Any, client: Any) -> None:
    """Add the counts of this broker's ``MessageLog`` to Redis through ``client`` (the broker's
    own on Redis, the coordinating one on RabbitMQ); a failure is logged, not raised."""
    for middleware in broker.middleware:
        counter = getattr(middleware, "throughput", None)
        if isinstance(counter, ThroughputCounter):
            try:
                counter.flush(client, broker.namespace)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                # Redis unreachable (an outage, a stop during one): its name says it all,
                # and the counts are kept for the next flush.
                logger.warning(
                    "Could not record message counts for the status history (%s); kept for later.",
                    type(error).__name__,
                )
            except Exception:
                logger.warning("Could not record message counts for the status history.", exc_info=True)


def record(broker: RedisBroker, *, sample_interval_ms: int) -> None:
    """The maintenance tick's part: flush this process's counts, then maybe sample the depth.

    Each part fails alone, logged: history is never worth a failed tick.
    """
    flush_counts(broker, broker.client)
    try:
        sample_depth(broker.client, broker.namespace, interval_ms=sample_interval_ms)
    except Exception:
        logger.warning("Could not record a queue-depth sample for the status history.", exc_info=True)


# -- reading (status) -----------------------------------------------------------


@dataclass
class DepthSample:
    """Each queue's messages by state at one moment."""

    at: datetime
    #: {queue: {"ready": n, "delayed": n, "in_flight": n, "dead": n}}; in flight None on RabbitMQ.
    queues: dict[str, dict[str, int | None]]


@dataclass
class MinuteCounts:
    """Messages processed during one minute, by queue and outcome."""

    #: The minute's start.
    minute: datetime
    #: {queue: {outcome: n}}
    queues: dict[str, dict[str, int]]


@dataclass
class History:
    """The last ``CHART_SPAN`` of samples and per-minute counts, oldest first."""

    since: datetime
    until: datetime
    depth: list[DepthSample] = field(default_factory=list)
    throughput: list[MinuteCounts] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "depth": [{"at": s.at.isoformat(), "queues": s.queues} for s in self.depth],
            "throughput": [{"minute": m.minute.isoformat(), "queues": m.queues} for m in self.throughput],
        }


def read_history(client: Any, namespace: str, *, now: datetime, span: timedelta = CHART_SPAN) -> History:
    """Samples and counts from ``now - span`` to ``now``; read-only (ZRANGE and HGETALL)."""
    since = now - span
    since_ms = int(since.timestamp() * 1000)
    now_ms = int(now.timestamp() * 1000)
    history = History(since=since, until=now)
    for raw, score in client.zrangebyscore(depth_key(namespace), since_ms, now_ms, withscores=True):
        try:
            data = json.loads(raw)
            depths = {
                str(queue): dict(
                    zip(QUEUE_STATES, (None if n is None else int(n) for n in figures), strict=True)
                )
                for queue, figures in (data.get("q") or {}).items()
            }
        except (ValueError, TypeError, AttributeError):
            continue  # a sample written by something else: not worth failing the page
        history.depth.append(DepthSample(at=datetime.fromtimestamp(score / 1000, UTC), queues=depths))
    first = int(since.timestamp()) // 60 * 60
    minutes = list(range(first, int(now.timestamp()) // 60 * 60 + 1, 60))
    with client.pipeline(transaction=False) as pipe:
        for minute in minutes:
            pipe.hgetall(processed_key(namespace, minute))
        rows = pipe.execute()
    for minute, row in zip(minutes, rows, strict=True):
        queues: dict[str, dict[str, int]] = {}
        for raw_field, raw_count in (row or {}).items():
            name = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            queue, _, outcome = name.rpartition(":")
            try:
                queues.setdefault(queue, {})[outcome] = int(raw_count)
            except ValueError:
                continue
        history.throughput.append(MinuteCounts(minute=datetime.fromtimestamp(minute, UTC), queues=queues))
    return history
