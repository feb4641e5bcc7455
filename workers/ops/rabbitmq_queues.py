"""The service's queues as RabbitMQ counts them, for ``health`` and ``status`` on ``BROKER_URL=amqp://…``.

Plain AMQP, so no management plugin is needed: a passive ``queue.declare``
answers a queue's ready messages and its consumers. It does not count the
messages consumers hold unacknowledged (fetched, or retries a worker keeps until
their time), and it cannot tell the age of the oldest message without taking it:
those figures are left unknown rather than guessed.

Each worker process holds one consumer on each of the service's queues, and
RabbitMQ drops a consumer as soon as its connection dies, so a queue's consumer
count is the number of live worker processes taking its messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pika
import pika.exceptions
from dramatiq.common import dq_name, xq_name

from workers.ops.snapshot import QUEUES, QueueFigures
from workers.settings import broker_nodes

#: AMQP reply code of a passive declare of a queue that does not exist.
NOT_FOUND = 404


def nodes(url: str) -> list[pika.URLParameters]:
    """The connection parameters of each RabbitMQ node ``url`` names (``;`` between nodes,
    as Dramatiq reads ``BROKER_URL``)."""
    return [pika.URLParameters(node) for node in broker_nodes(url)]


def location(url: str) -> str:
    """``host:port/vhost`` of each node of an AMQP URL, without its credentials."""
    return ", ".join(
        f"{parameters.host}:{parameters.port}{parameters.virtual_host and '/' + parameters.virtual_host}"
        for parameters in nodes(url)
    )


@contextmanager
def amqp_connection(url: str, *, timeout: float) -> Iterator[pika.BlockingConnection]:
    """One connection to the first node of ``url`` that answers, each given up after
    ``timeout`` seconds (no retries).

    Raises pika's ``AMQPError`` when no node answers or they refuse.
    """
    candidates = nodes(url)
    for parameters in candidates:
        parameters.connection_attempts = 1
        parameters.retry_delay = 0
        parameters.socket_timeout = timeout
        parameters.stack_timeout = timeout
        parameters.blocked_connection_timeout = timeout
    connection = pika.BlockingConnection(candidates)
    try:
        yield connection
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def queue_state(connection: pika.BlockingConnection, queue: str) -> Any:
    """The passive declare's answer (``message_count``, ``consumer_count``); None: no such queue."""
    # A refused declare closes its channel, so each queue gets a channel of its own.
    channel = connection.channel()
    try:
        return channel.queue_declare(queue, passive=True).method
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == NOT_FOUND:
            return None
        raise
    finally:
        if channel.is_open:
            channel.close()


def queue_states(connection: pika.BlockingConnection, queues: Iterable[str]) -> dict[str, Any]:
    """``queue_state`` of each queue, by name."""
    return {queue: queue_state(connection, queue) for queue in queues}


def rabbitmq_figures(url: str, *, timeout: float, queues: tuple[str, ...] = QUEUES) -> list[QueueFigures]:
    """Each queue's figures as RabbitMQ tells them (a queue not declared yet counts nothing).

    ``ready`` is the queue's ready messages, ``delayed`` those of its ``.DQ``
    (retries no worker holds yet: a worker keeps the ones it fetched until their
    time, unacknowledged), ``dead`` those of its ``.XQ``, ``consumers`` the
    worker processes taking from it. ``in_flight`` and the oldest ready
    message's age are None: plain AMQP does not tell them.
    """
    names = [name for queue in queues for name in (queue, dq_name(queue), xq_name(queue))]
    with amqp_connection(url, timeout=timeout) as connection:
        states = queue_states(connection, names)

    def ready(name: str) -> int:
        state = states[name]
        return int(state.message_count) if state is not None else 0

    return [
        QueueFigures(
            name=queue,
            ready=ready(queue),
            delayed=ready(dq_name(queue)),
            in_flight=None,
            dead=ready(xq_name(queue)),
            oldest_ready_age_seconds=None,
            consumers=int(states[queue].consumer_count) if states[queue] is not None else 0,
        )
        for queue in queues
    ]
