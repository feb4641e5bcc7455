"""Fast crash recovery and riding out Redis outages.

Dramatiq's Redis broker returns a dead worker's messages only when some later
broker call rolls its 0.1 % maintenance dice and the worker's heartbeat is older
than the heartbeat timeout: on a quiet system that can take many minutes. Here
every worker process runs maintenance on every queue on a schedule (which also
refreshes its own heartbeat, even while all its threads are busy), so a
SIGKILLed worker's messages are back within the heartbeat timeout plus one
interval.

Through a Redis outage, a worker's Redis commands retry with backoff instead of
failing, so nothing held in memory (prefetched messages, delayed retries) is
dropped. If an outage outlasts that patience, Dramatiq's consumers drop what
they held; the worker then takes a new broker id, so the maintenance of the
living returns everything the old id held.

On RabbitMQ, RabbitMQ itself returns a dead worker's messages; each worker
process still registers and heartbeats in Redis on the same schedule (the
registry ``status`` and ``health --this-host`` read) and adds its message counts
to the status history. A registration silent for ``FORGET_AFTER_TIMEOUTS``
heartbeat timeouts is forgotten, since no broker maintenance buries it there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from workers import consumer, dead_letters
from workers.ops import history
from workers.rabbitmq import ServiceRabbitmqBroker
from workers.redis_dispatch import run_maintenance
from workers.settings import DEFAULT_HEARTBEAT_TIMEOUT_MS, DEFAULT_HISTORY_SAMPLE_INTERVAL_MS

logger = logging.getLogger(__name__)

#: Longest pause between two tries of a Redis command during an outage, in seconds.
REDIS_RETRY_CAP_SECONDS = 2.0

#: Dead letters parked in Redis are filed in SQL this often, in milliseconds.
DEAD_LETTER_SYNC_INTERVAL_MS = 60_000

#: On RabbitMQ, a registration silent for this many heartbeat timeouts is forgotten
#: (listed as dead until then, as a killed worker is on Redis until maintenance buries it).
FORGET_AFTER_TIMEOUTS = 2


class _OutageRetry(Retry):
    """redis-py's retry, telling us when an outage outlasted it."""

    def __init__(self, *, patience_seconds: float, on_give_up: Callable[[], None]) -> None:
        super().__init__(
            ExponentialBackoff(cap=REDIS_RETRY_CAP_SECONDS, base=0.05),
            retries=max(1, int(patience_seconds / REDIS_RETRY_CAP_SECONDS) + 5),
        )
        self._patience_seconds = patience_seconds
        self._on_give_up = on_give_up

    def __deepcopy__(self, memo: dict[int, Any]) -> _OutageRetry:
        # redis-py gives each connection its own copy; the callback is shared.
        return _OutageRetry(patience_seconds=self._patience_seconds, on_give_up=self._on_give_up)

    def call_with_retry(
        self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False
    ) -> Any:
        def failed(error: Exception, *args: Any) -> Any:
            # The command may have run with its reply lost: consumers check what they fetched.
            consumer.note_connection_error()
            result = fail(error, *args)
            if consumer.stopping_patience_spent():
                # A stopping worker does not wait out the outage: no more tries.
                raise error
            return result

        try:
            return super().call_with_retry(do, failed, is_retryable, with_failure_count)
        except (redis.ConnectionError, redis.TimeoutError):
            self._on_give_up()
            raise


class BrokerMaintenance(dramatiq.Middleware):
    """Scheduled heartbeat and queue maintenance, and Redis retries through outages."""

    def __init__(
        self,
        *,
        interval_ms: int,
        outage_patience_seconds: float,
        history_sample_interval_ms: int = DEFAULT_HISTORY_SAMPLE_INTERVAL_MS,
        heartbeat_timeout_ms: int = DEFAULT_HEARTBEAT_TIMEOUT_MS,
    ) -> None:
        """``interval_ms``, ``history_sample_interval_ms`` and ``heartbeat_timeout_ms`` in
        milliseconds; ``outage_patience_seconds`` in seconds."""
        self.interval_ms = interval_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.history_sample_interval_ms = history_sample_interval_ms
        self.outage_patience_seconds = outage_patience_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gave_up = threading.Event()
        self._last_sync_ms = 0
        self._started_at = time.time()

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        if isinstance(broker, RedisBroker):
            broker.client.set_retry(
                _OutageRetry(patience_seconds=self.outage_patience_seconds, on_give_up=self._gave_up.set)
            )

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._started_at = time.time()
        run: Callable[[Any], None]
        if isinstance(broker, RedisBroker):
            self._register(broker.client, broker.namespace, broker.broker_id)
            run = self._run
        elif isinstance(broker, ServiceRabbitmqBroker):
            # Registered by the first tick, in the thread: Redis only coordinates here,
            # and a Redis outage must not hold up a worker whose broker is up.
            run = self._run_registry
        else:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=run, args=(broker,), name="broker-maintenance", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        # From here on, a Redis outage is not waited out: a stop must not take minutes.
        consumer.begin_stopping()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if isinstance(broker, RedisBroker):
            # The last interval's message counts, for the status history (logged if lost).
            history.flush_counts(broker, broker.client)
            with contextlib.suppress(redis.RedisError):
                broker.client.hdel(workers_key(broker.namespace), broker.broker_id)
        elif isinstance(broker, ServiceRabbitmqBroker):
            history.flush_counts(broker, broker.coordination)
            with (
                contextlib.suppress(redis.RedisError),
                broker.coordination.pipeline(transaction=True) as pipe,
            ):
                pipe.hdel(workers_key(broker.namespace), broker.broker_id)
                pipe.zrem(heartbeats_key(broker.namespace), broker.broker_id)
                pipe.execute()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        consumer.end_stopping()

    def _info(self) -> str:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "pid_namespace": pid_namespace(),
                "started_at": self._started_at,
            }
        )

    def _register(self, client: redis.Redis, namespace: str, broker_id: str) -> None:
        """Say this broker id is a worker: producers heartbeat too, but never register."""
        client.hset(workers_key(namespace), broker_id, self._info())

    # -- the schedule --------------------------------------------------------

    def _run(self, broker: RedisBroker) -> None:
        while not self._stop.wait(self.interval_ms / 1000):
            try:
                self.tick(broker)
            except Exception:
                logger.warning("Broker maintenance failed; trying again next interval.", exc_info=True)

    def tick(self, broker: RedisBroker) -> None:
        """One pass: heartbeat and maintenance on every queue, then housekeeping."""
        if self._gave_up.is_set():
            self._gave_up.clear()
            old = broker.broker_id
            broker.broker_id = str(uuid.uuid4())
            broker.client.hdel(workers_key(broker.namespace), old)
            logger.warning(
                "A Redis outage outlasted the retries: broker id %s is abandoned for %s; "
                "its messages return to their queues after the heartbeat timeout.",
                old,
                broker.broker_id,
            )
        queues = broker.get_declared_queues() | broker.get_declared_delay_queues()
        for queue_name in sorted(queues):
            run_maintenance(broker, queue_name)
        self._register(broker.client, broker.namespace, broker.broker_id)
        forget_dead_workers(broker.client, broker.namespace)
        # The status page's history; it logs its own failures, never failing the tick.
        history.record(broker, sample_interval_ms=self.history_sample_interval_ms)
        now = current_millis()
        if now - self._last_sync_ms >= DEAD_LETTER_SYNC_INTERVAL_MS:
            self._last_sync_ms = now
            dead_letters.sync(broker, broker.get_declared_queues())

    # -- on RabbitMQ ---------------------------------------------------------

    def _run_registry(self, broker: ServiceRabbitmqBroker) -> None:
        while True:
            try:
                self.registry_tick(broker)
            except Exception:
                logger.warning(
                    "Could not refresh this worker's registration in Redis; trying again next interval.",
                    exc_info=True,
                )
            if self._stop.wait(self.interval_ms / 1000):
                return

    def registry_tick(self, broker: ServiceRabbitmqBroker) -> None:
        """One pass on RabbitMQ: heartbeat and registration in Redis, the silent forgotten, counts added."""
        client, namespace = broker.coordination, broker.namespace
        now = current_millis()
        with client.pipeline(transaction=True) as pipe:
            pipe.zadd(heartbeats_key(namespace), {broker.broker_id: now})
            pipe.hset(workers_key(namespace), broker.broker_id, self._info())
            pipe.execute()
        forget_dead_workers(
            client, namespace, silent_before_ms=now - FORGET_AFTER_TIMEOUTS * self.heartbeat_timeout_ms
        )
        history.flush_counts(broker, client)
        try:
            history.sample_rabbitmq_depth(
                client, namespace, broker.url, interval_ms=self.history_sample_interval_ms
            )
        except Exception as exc:
            # The error's name only: a connection error may spell out the URL, password included.
            logger.warning(
                "Could not record a queue-depth sample from RabbitMQ for the status history (%s).",
                type(exc).__name__,
            )


def workers_key(namespace: str) -> str:
    """The hash of registered worker processes: broker id -> {pid, host, pid_namespace, started_at}."""
    return f"{namespace}:__workers__"


#: Where Linux names the calling process's PID namespace (``pid:[4026531836]``).
PID_NAMESPACE_LINK = "/proc/self/ns/pid"


def pid_namespace() -> str | None:
    """This process's PID namespace, or None where the system does not say (not Linux).

    Containers that share their host's network share its host name too, but each
    still has a PID namespace of its own (unless it shares the host's as well):
    with the host name, it tells one container's workers from another's.
    """
    try:
        return os.readlink(PID_NAMESPACE_LINK)
    except OSError:
        return None


def heartbeats_key(namespace: str) -> str:
    """The sorted set of last heartbeats: broker id, scored by epoch milliseconds."""
    return f"{namespace}:__heartbeats__"


def forget_dead_workers(
    client: redis.Redis, namespace: str, *, silent_before_ms: float | None = None
) -> None:
    """Unregister workers with no heartbeat left (on Redis, maintenance buried them), or,
    with ``silent_before_ms`` (epoch milliseconds), none since then (their heartbeat goes too)."""
    key = workers_key(namespace)
    registered = [w.decode() if isinstance(w, bytes) else str(w) for w in client.hkeys(key)]
    if not registered:
        return
    heartbeats = client.zmscore(heartbeats_key(namespace), registered)
    gone = [
        worker
        for worker, beat in zip(registered, heartbeats, strict=True)
        if beat is None or (silent_before_ms is not None and beat < silent_before_ms)
    ]
    if gone:
        with client.pipeline(transaction=True) as pipe:
            pipe.hdel(key, *gone)
            if silent_before_ms is not None:
                pipe.zrem(heartbeats_key(namespace), *gone)
            pipe.execute()
