"""Dramatiq's RabbitMQ broker, for fleets that outgrow one Redis (``BROKER_URL=amqp://…``).

Messages, retries (delayed on ``{queue}.DQ``) and Dramatiq's dead-letter queue
(``{queue}.XQ``, where RabbitMQ dead-letters what a worker rejects) live in
RabbitMQ. RabbitMQ returns a dead worker's unacknowledged messages as soon as
its connection drops, so the Redis broker's heartbeats and scheduled
maintenance have no counterpart here. The ``dead_letters`` table stays the
record operators work from; retrying or purging a record removes its copies
from ``{queue}.XQ`` (see ``remove_dead_copies``).

Redis (``REDIS_URL``) still coordinates what RabbitMQ cannot: schedulers'
job slots and dead-letter reasons parked through a database outage (see
``workers.coordination``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pika
import pika.exceptions
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer, _RabbitmqMessage
from dramatiq.common import current_millis, xq_name
from dramatiq.errors import ConnectionClosed, DecodeError
from dramatiq.message import Message
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from models.types import utc_now
from workers import dead_letters
from workers.broker_errors import AMQP_HANDSHAKE_REFUSALS, BatchMaybeQueued

logger = logging.getLogger(__name__)

#: pika logs every failed connection attempt at ERROR with a traceback (several per
#: attempt), before Dramatiq turns it into ``ConnectionClosed``, which the service
#: reports once (``BrokerUnavailable``, or the worker's reconnection warning).
PIKA_LOG_LEVEL = logging.CRITICAL
logging.getLogger("pika").setLevel(PIKA_LOG_LEVEL)

#: ``remove_dead_copies`` and ``dead_copies`` look at no more than this many dead letters of one queue:
#: it reads the queue from its head, since RabbitMQ cannot delete one message by id.
MAX_DEAD_LETTER_SCAN = 100_000

#: Attempts to publish one batch (``enqueue_many``), each on a new connection after the first.
BATCH_ATTEMPTS = 6

#: The wait before a batch's second attempt, in seconds; it doubles before each next one
#: (6.2 s in all: a RabbitMQ node restarting, or a load balancer moving, is outlasted).
BATCH_RETRY_DELAY_SECONDS = 0.2

#: What a dropped or refused connection raises through pika's blocking adapter.
_CONNECTION_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)


class _UnansweredCommit(Exception):
    """The connection dropped after the commit was sent, before its answer."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


class ServiceRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, whose consumers dead-letter malformed messages with a reason.

    ``coordination`` is the Redis client of ``REDIS_URL``, connected on first
    use (a producer that never needs it never opens it).
    """

    def __init__(
        self, *, url: str, namespace: str, coordination: Callable[[], redis.Redis], **options: Any
    ) -> None:
        super().__init__(url=url, **options)
        #: The AMQP URL (with its credentials: never print it), for reading queue figures.
        self.url = url
        self.namespace = namespace
        #: This process's id in the Redis registry of workers (as the Redis broker's own).
        self.broker_id = str(uuid.uuid4())
        self._coordination_factory = coordination
        self._coordination: redis.Redis | None = None
        self._coordination_lock = threading.Lock()
        #: Per thread: ``channel``, in transaction mode, and ``returned`` (see ``enqueue_many``).
        self._transactions = threading.local()

    @property
    def consumer_class(self) -> type[TolerantRabbitmqConsumer]:
        return TolerantRabbitmqConsumer

    @property
    def coordination(self) -> redis.Redis:
        with self._coordination_lock:
            if self._coordination is None:
                self._coordination = self._coordination_factory()
            return self._coordination

    def enqueue_many(self, messages: Sequence[Message[Any]]) -> None:
        """Publish messages in one AMQP transaction: all of them, or none.

        ``enqueue`` waits for RabbitMQ's confirmation of each message, one round
        trip per message. Here the batch is published on a channel in transaction
        mode and committed once: ``Tx.CommitOk`` gives the same guarantee as a
        confirmation (persistent messages on durable queues), and a batch cut
        short by a dropped connection is rolled back by RabbitMQ. So it is tried
        again on a new connection (``BATCH_ATTEMPTS`` in all, waiting
        ``BATCH_RETRY_DELAY_SECONDS``, doubling, between them), and raises
        ``ConnectionClosed`` when no attempt got through: none of the batch was
        queued. If an attempt's commit went unanswered (the connection dropped
        between the commit and its answer), RabbitMQ may have queued the batch:
        the next attempt may then queue it twice (the actors are idempotent), and
        if none gets through ``BatchMaybeQueued`` says so.
        Middleware sees each message as with ``enqueue``.
        """
        pending = list(messages)
        unanswered = False
        failure: BaseException | str = ""
        for attempt in range(1, BATCH_ATTEMPTS + 1):
            try:
                pending = self._publish_in_transaction(pending)
            except _UnansweredCommit as error:
                unanswered = True
                failure = error.cause
            except (*_CONNECTION_ERRORS, AMQPConnectorException) as error:
                failure = error
                if isinstance(error, tuple(AMQP_HANDSHAKE_REFUSALS)):
                    # Bad credentials or vhost: no retry changes that.
                    del self.connection
                    raise ConnectionClosed(error) from None  # type: ignore[no-untyped-call]
            else:
                if not pending:
                    return
                # Returned as unroutable: published again at once, their queue declared anew.
                failure = f"RabbitMQ returned {len(pending)} messages as unroutable {attempt} times"
                continue
            # As enqueue: the next attempt opens a new connection and channel.
            del self.connection
            if attempt < BATCH_ATTEMPTS:
                delay = BATCH_RETRY_DELAY_SECONDS * 2 ** (attempt - 1)
                logger.debug("Retrying a batch of %d messages in %.1f s: %r", len(pending), delay, failure)
                time.sleep(delay)
        if unanswered:
            raise BatchMaybeQueued(failure)  # type: ignore[no-untyped-call]
        raise ConnectionClosed(failure)  # type: ignore[no-untyped-call]

    def _publish_in_transaction(self, messages: list[Message[Any]]) -> list[Message[Any]]:
        """Publish and commit; returns the messages RabbitMQ returned as unroutable, to publish again.

        A queue deleted since this process declared it makes its messages
        unroutable (``mandatory``): they come back before the commit's answer,
        and are published again once their queue is declared anew.
        """
        for queue_name in {message.queue_name for message in messages}:
            self.declare_queue(queue_name, ensure=True)
        channel, returned = self._transaction_channel()
        committing = False
        try:
            for message in messages:
                self.emit_before("enqueue", message, None)
                channel.basic_publish(
                    exchange="",
                    routing_key=message.queue_name,
                    body=message.encode(),
                    properties=pika.BasicProperties(
                        delivery_mode=2, priority=message.options.get("broker_priority")
                    ),
                    mandatory=True,
                )
            committing = True
            channel.tx_commit()
        except BaseException as error:
            # Closing the channel discards what this transaction published.
            del self._transactions.channel
            if channel.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    channel.close()
            if committing and isinstance(error, _CONNECTION_ERRORS):
                raise _UnansweredCommit(error) from error
            raise
        # Committed: whatever happens now, the batch is queued.
        try:
            # The returns arrived before the commit's answer; this hands them to the callback.
            self.connection.process_data_events(time_limit=0)
        except _CONNECTION_ERRORS as error:
            logger.warning(
                "The connection dropped after RabbitMQ committed a batch of %d messages; "
                "a message it returned as unroutable would not be known: %r",
                len(messages),
                error,
            )
            del self.connection
        returned_ids = {_message_id_of(body) for body in returned}
        returned.clear()
        again = [message for message in messages if message.message_id in returned_ids]
        for message in again:
            self.queues_pending.add(message.queue_name)
        for message in messages:
            if message.message_id not in returned_ids:
                self.emit_after("enqueue", message, None)
        return again

    def _transaction_channel(self) -> tuple[BlockingChannel, list[bytes]]:
        """This thread's channel in transaction mode, and the bodies RabbitMQ returned on it.

        Kept from one batch to the next (a transaction starts again after each
        commit): a batch then costs one round trip, its commit.
        """
        state = self._transactions
        channel: BlockingChannel | None = getattr(state, "channel", None)
        if channel is None or not channel.is_open or channel.connection is not self.connection:
            returned: list[bytes] = []
            channel = self.connection.channel()
            channel.add_on_return_callback(lambda _channel, _method, _properties, body: returned.append(body))
            channel.tx_select()
            state.channel, state.returned = channel, returned
        return channel, state.returned

    @property
    def client(self) -> redis.Redis:
        # An AttributeError, so getattr(broker, "client", None) still says "none".
        raise AttributeError(
            "the broker is RabbitMQ (BROKER_URL): its queue figures are RabbitMQ's "
            "(rabbitmqctl list_queues, or the management UI), not Redis's"
        )


class TolerantRabbitmqConsumer(_RabbitmqConsumer):
    """Dramatiq's RabbitMQ consumer (2.x), filing malformed messages in SQL before rejecting them.

    Dramatiq rejects a body it cannot decode without saying why anywhere but a
    log line, and a message naming another queue kills the worker thread that
    finishes it. Here both are rejected to ``{queue}.XQ`` and recorded with
    actor ``(malformed)`` and their reason.
    """

    def __next__(self) -> _RabbitmqMessage | None:
        try:
            method, properties, body = next(self.iterator)
            if method is None:
                return None
        except (AssertionError, pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
            if getattr(e, "reply_code", None) == 404:
                self.broker.queues_pending.add(self.queue_name.removesuffix(".DQ"))
            raise ConnectionClosed(e) from None  # type: ignore[no-untyped-call]
        try:
            message: Message[Any] = Message.decode(body)
        except DecodeError as error:
            self._reject_malformed(
                method, properties, body, "DecodeError", dead_letters.decode_problem(body, error)
            )
            return None
        problem = dead_letters.envelope_problem(
            message, (self.queue_name,), redis_id=False, fetched_at_ms=current_millis()
        )
        if problem is not None:
            self._reject_malformed(method, properties, body, "MalformedMessage", problem)
            return None
        proxy = _RabbitmqMessage(method.redelivered, method.delivery_tag, message)  # type: ignore[no-untyped-call]
        self.known_tags.add(method.delivery_tag)
        return proxy

    def _reject_malformed(
        self, method: Any, properties: Any, body: bytes, exception_type: str, reason: str
    ) -> None:
        # The AMQP message id when the producer set one, else the body's: purge finds
        # the copy in {queue}.XQ by either. Otherwise one of our own, which only the SQL
        # record knows (the body may hold anything): that copy stays until it expires.
        found = getattr(properties, "message_id", None) or _message_id_of(body)
        message_id = str(found or uuid.uuid4())[:64]
        logger.error(
            "Message %s on %s is malformed (%s): dead-lettered.", message_id, self.queue_name, reason
        )
        try:
            fields = dead_letters.describe_malformed(
                message_id, self.queue_name, exception_type=exception_type, reason=reason, now=utc_now()
            )
            fields["redis_message_id"] = None
            dead_letters.record(self.broker, fields)
        finally:
            self._nack(method.delivery_tag)  # type: ignore[no-untyped-call]


def _message_id_of(body: bytes) -> str | None:
    try:
        value = json.loads(body).get("message_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def remove_dead_copies(broker: RabbitmqBroker, queue_name: str, message_ids: Iterable[str]) -> int:
    """Delete every copy of these messages from ``{queue}.XQ``; returns how many were deleted.

    RabbitMQ deletes messages only from a queue's head, so this reads the queue
    on a channel of its own without acknowledging, acknowledges the copies to
    delete, and closes the channel: RabbitMQ puts every other message back where
    it was, with its expiry unchanged. Costs one pass over the queue.
    """
    return len(_scan_dead_copies(broker, queue_name, set(message_ids), remove=True))


def dead_copies(broker: RabbitmqBroker, queue_name: str, message_ids: Iterable[str]) -> set[str]:
    """Which of these messages ``{queue}.XQ`` holds; one pass over it, every message put back."""
    return set(_scan_dead_copies(broker, queue_name, set(message_ids), remove=False))


def _scan_dead_copies(
    broker: RabbitmqBroker, queue_name: str, wanted: set[str], *, remove: bool
) -> list[str]:
    """The ids of the wanted copies found in ``{queue}.XQ`` (each copy once), acknowledged if ``remove``."""
    if not wanted:
        return []
    found = []
    connection = pika.BlockingConnection(parameters=broker.parameters)
    try:
        channel = connection.channel()
        try:
            for _ in range(MAX_DEAD_LETTER_SCAN):
                method, properties, body = channel.basic_get(xq_name(queue_name), auto_ack=False)
                if method is None:
                    break
                # A Dramatiq message's id is in its body; a malformed one is recorded
                # under its AMQP message_id property when it has one.
                ids = wanted.intersection((_message_id_of(body), getattr(properties, "message_id", None)))
                if ids:
                    found.append(ids.pop())
                    if remove:
                        channel.basic_ack(method.delivery_tag)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            # No such queue: no copy.
        if channel.is_open:
            channel.close()
    finally:
        connection.close()
    return found
