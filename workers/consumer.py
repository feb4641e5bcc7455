"""Dramatiq's Redis consumer, made to survive malformed messages and lost fetch replies.

Anyone may write a message to Redis (the wire format is public), and Dramatiq
trusts what it reads there. A body that is not JSON makes its consumer raise
out of its loop: the consumer restarts, and the bad message and everything
prefetched with it stay fetched by a living worker, so they are never processed
until that worker dies (and the next worker to fetch the bad message stalls the
same way). A message whose ``queue_name`` names a queue this worker does not
consume kills the worker thread that finishes it; one without its Redis id can
be neither acknowledged nor dead-lettered.

This consumer sends such messages to the dead-letter queue with their reason
instead. Its loop is Dramatiq's own (2.x), with those checks added.

It also recovers messages fetched but never received. A fetch moves message
ids to this worker's "unacknowledged" set in Redis and returns their bodies; if
the connection drops after Redis ran it (a Redis restart, a failover), the
retried fetch returns other messages and the first ones stay reserved by a
worker that is alive and never heard of them, until it stops. So after any
Redis connection error, and when a consumer (re)starts, each consumer compares
its queue's unacknowledged set with what this process holds, before its next
fetch, and puts the difference back on the queue.

An idle consumer polls its queue with a Lua script, backing off up to the
worker's idle timeout (``WORKER_TIMEOUT_MS``, 50 ms: what a contract sent to an
idle worker waits at most). Only ``contracts``, ``contracts-bulk`` and ``emails``
need that. A delay queue (``Q.DQ``: retries waiting for their time) is fetched
early and held until its messages are due, and the ``maintenance`` queue runs
scheduled jobs: those consumers back off up to ``PATIENT_POLL_MS`` instead, never
longer than half the shortest retry delay, so that no retry waits longer. Five
of a worker process's eight consumers poll that slowly: an idle worker runs 60 %
fewer scripts on Redis, which matters for a fleet sharing one Redis.

Dramatiq retries a failed acknowledgement every 5 seconds for as long as Redis
is down, and a stopping worker waits for those retries: a stop during an outage
would take until Redis came back. Once the worker has been stopping for
``STOPPING_PATIENCE_SECONDS``, an acknowledgement that cannot reach Redis is
given up instead: the message stays reserved under this worker's id and is
processed again after its heartbeat expires, as after a kill (the actors are
idempotent: a contract or an email already done is not done twice).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import compute_backoff, current_millis, q_name
from dramatiq.errors import BrokerConnectionError, ConnectionClosed, DecodeError
from dramatiq.message import Message

from models.messages import MAINTENANCE_QUEUE
from workers import dead_letters
from workers.settings import RETRYING_ACTORS, Settings, get_settings

logger = logging.getLogger(__name__)

_lock = threading.Lock()
#: Redis ids of the messages this process fetched and has not acked, nacked or requeued, per queue.
_held: defaultdict[str, set[str]] = defaultdict(set)
#: Redis connection errors seen by this process so far.
_connection_errors = 0

#: Once a worker is stopping, how long its Redis commands keep retrying, in seconds:
#: long enough for a failover, not the whole outage patience.
STOPPING_PATIENCE_SECONDS = 5.0

#: ``time.monotonic()`` when this worker process began to stop, else None.
_stopping_since: float | None = None


def begin_stopping() -> None:
    """This worker process is stopping: Redis outages are no longer waited out for long."""
    global _stopping_since
    _stopping_since = time.monotonic()


def end_stopping() -> None:
    """The worker has stopped: another one this process boots (as tests do) starts patient again."""
    global _stopping_since
    _stopping_since = None


def stopping_patience_spent() -> bool:
    """Whether this worker process has been stopping for ``STOPPING_PATIENCE_SECONDS``."""
    since = _stopping_since
    return since is not None and time.monotonic() - since >= STOPPING_PATIENCE_SECONDS


def note_connection_error() -> None:
    """A Redis command failed and may be retried: a fetch's reply may have been lost."""
    global _connection_errors
    with _lock:
        _connection_errors += 1


def _hold(queue_name: str, redis_ids: Iterable[Any]) -> None:
    with _lock:
        _held[queue_name].update(str(i) for i in redis_ids if i is not None)


def _release(queue_name: str, redis_ids: Iterable[Any]) -> None:
    with _lock:
        _held[queue_name].difference_update(str(i) for i in redis_ids if i is not None)


#: The longest idle poll of the queues that are in no hurry (delay queues and
#: ``maintenance``), in milliseconds: Dramatiq's own default idle timeout.
PATIENT_POLL_MS = 1000


def patient_poll_ms(settings: Settings, *, worker_timeout_ms: int) -> int:
    """How long an idle delay or maintenance queue's consumer may wait between polls, in milliseconds.

    ``PATIENT_POLL_MS``, but under half the shortest retry delay of any actor
    (Dramatiq's first retry waits half ``MIN_BACKOFF_MS`` at the least), so that
    a retry is fetched before it is due; never under the worker's own idle timeout.
    """
    shortest_backoff_ms = min(
        settings.retry_policy(actor_name).min_backoff_ms for actor_name in ("", *RETRYING_ACTORS)
    )
    return max(worker_timeout_ms, min(PATIENT_POLL_MS, shortest_backoff_ms // 2))


def is_patient(queue_name: str) -> bool:
    """Whether a queue's messages can wait for a slower poll: a delay queue, or ``maintenance``."""
    return queue_name != q_name(queue_name) or queue_name == MAINTENANCE_QUEUE


class TolerantRedisConsumer(_RedisConsumer):
    """A Redis consumer that dead-letters malformed messages and recovers lost fetches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        if is_patient(self.queue_name):
            # The idle backoff's ceiling (Dramatiq's loop reads it); busy, a consumer does not wait.
            self.timeout = patient_poll_ms(get_settings(), worker_timeout_ms=self.timeout)
        # -1: reconcile before the first fetch (a restarted consumer lost its predecessor's cache).
        self._reconciled_at = -1

    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                try:
                    data = self.message_cache.pop(0)
                except IndexError:
                    # Prefetch up to the limit; when there is nothing, back off
                    # progressively up to the idle timeout.
                    messages: list[Any] = []
                    if self.outstanding_message_count < self.prefetch:
                        self._reconcile()
                        self.message_cache = messages = self.broker.do_fetch(
                            self.queue_name, self.prefetch - self.outstanding_message_count
                        )
                    if not messages:
                        self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                        time.sleep(backoff_ms / 1000)
                        return None
                    continue
                if data is None:
                    # Its id was queued without a body: nothing to process.
                    logger.warning("A message id on %s has no body; skipped.", self.queue_name)
                    continue
                self.misses = 0
                message = self._checked(data)
                if message is None:
                    continue
                _hold(self.queue_name, [message.options["redis_message_id"]])
                self.queued_message_ids.add(message.message_id)
                return MessageProxy(message)
        except redis.ConnectionError as e:
            raise ConnectionClosed(e) from None  # type: ignore[no-untyped-call]

    def _checked(self, data: bytes) -> Message[Any] | None:
        """The decoded message, or None once a malformed one is dead-lettered."""
        try:
            message: Message[Any] = Message.decode(data)
        except DecodeError as error:
            reason = dead_letters.decode_problem(data, error)
            dead_letters.dead_letter_malformed(
                self.broker, self.queue_name, data, exception_type="DecodeError", reason=reason
            )
            return None
        problem = dead_letters.envelope_problem(message, (self.queue_name,), fetched_at_ms=current_millis())
        if problem is not None:
            dead_letters.dead_letter_malformed(
                self.broker, self.queue_name, data, exception_type="MalformedMessage", reason=problem
            )
            return None
        return message

    def ack(self, message: Any) -> None:
        with self._given_up_when_stopping(message, "acknowledged"):
            super().ack(message)  # type: ignore[no-untyped-call]
        # Only once Redis took it: an ack retried through an outage is still held.
        _release(self.queue_name, [message.options.get("redis_message_id")])

    def nack(self, message: Any) -> None:
        with self._given_up_when_stopping(message, "dead-lettered"):
            super().nack(message)  # type: ignore[no-untyped-call]
        _release(self.queue_name, [message.options.get("redis_message_id")])

    @contextlib.contextmanager
    def _given_up_when_stopping(self, message: Any, done: str) -> Iterator[None]:
        """Let a connection error through, unless the stopping worker has waited long enough."""
        try:
            yield
        except BrokerConnectionError as error:
            if not stopping_patience_spent():
                raise
            logger.warning(
                "Message %s on %s could not be %s while stopping (%s): it is processed again "
                "once this worker's heartbeat expires.",
                message.message_id,
                self.queue_name,
                done,
                type(error).__name__,
            )

    def requeue(self, messages: Iterable[Any]) -> None:
        messages = list(messages)
        try:
            super().requeue(messages)  # type: ignore[no-untyped-call]
        except redis.ConnectionError as error:
            # Dramatiq's consumer lets this one through untranslated: a stopping
            # worker would exit on it with a traceback (its callers expect ConnectionClosed).
            if not stopping_patience_spent():
                raise ConnectionClosed(error) from None  # type: ignore[no-untyped-call]
            self._not_put_back(len(messages), error)
            return
        _release(self.queue_name, [m.options.get("redis_message_id") for m in messages])

    def close(self) -> None:
        """Put the rest of the last fetch back on the queue, then close.

        Dramatiq's consumer thread stops between two messages of a fetch: the
        messages still in this consumer's cache are reserved for this worker in
        Redis and would wait for its heartbeat to expire (``HEARTBEAT_TIMEOUT_MS``)
        before another worker took them. A graceful stop puts them back at once.
        """
        cached, self.message_cache = self.message_cache, []
        redis_ids = []
        for data in cached:
            try:
                redis_ids.append(Message.decode(data).options["redis_message_id"])
            except (DecodeError, KeyError, TypeError):
                # Not a message this consumer could read: the heartbeat sweep returns it.
                continue
        if redis_ids:
            try:
                self.broker.do_requeue(self.queue_name, *redis_ids)
            except redis.RedisError as error:
                self._not_put_back(len(redis_ids), error)
        super().close()

    def _not_put_back(self, count: int, error: Exception) -> None:
        logger.warning(
            "%d message(s) on %s could not be put back (%s): they return once this worker's "
            "heartbeat expires.",
            count,
            self.queue_name,
            type(error).__name__,
        )

    def _reconcile(self) -> None:
        """Requeue what this worker reserved in Redis but does not hold (called with an empty cache).

        Race-free because only this thread fetches this queue in this process: the
        snapshot of what is held is taken before reading Redis, so a message acked
        in between is not mistaken for a lost one (and requeue skips ids no longer
        reserved).
        """
        with _lock:
            errors = _connection_errors
            if errors == self._reconciled_at:
                return
            held = set(_held[self.queue_name])
        acks = f"{self.broker.namespace}:__acks__.{self.broker.broker_id}.{self.queue_name}"
        reserved = {m.decode() if isinstance(m, bytes) else str(m) for m in self.broker.client.smembers(acks)}
        lost = sorted(reserved - held)
        if lost:
            logger.warning(
                "%d message(s) on %s were fetched but never received (a Redis reply was lost); requeued.",
                len(lost),
                self.queue_name,
            )
            self.broker.do_requeue(self.queue_name, *lost)
        self._reconciled_at = errors
