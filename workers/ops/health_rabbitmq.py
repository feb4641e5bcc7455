"""``contract-dispatch health`` on RabbitMQ (BROKER_URL=amqp://...): the broker and its consumers.

Redis is still checked (it coordinates). Whether workers are live is asked of
RabbitMQ itself, which knows who consumes: each worker process holds one
consumer on each of the service's queues, and RabbitMQ drops a consumer as soon
as its connection dies, so a queue's consumer count is the number of live worker
processes taking its messages. RabbitMQ does not say which host a consumer runs
on: ``--this-host`` reads the workers' registry in Redis instead, as on Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pika
import pika.exceptions

from workers.ops.health import CheckFailed, describe_error
from workers.ops.rabbitmq_queues import amqp_connection, location, queue_states
from workers.ops.snapshot import CONSUMED_QUEUES, QUEUES
from workers.rabbitmq import PIKA_LOG_LEVEL
from workers.settings import Settings

# pika logs each failed connection attempt with its traceback; a check reports it once.
logging.getLogger("pika").setLevel(PIKA_LOG_LEVEL)


@contextmanager
def _connection(settings: Settings, timeout: float) -> Iterator[tuple[pika.BlockingConnection, str]]:
    """One connection to BROKER_URL that gives up after ``timeout`` seconds, and where it goes."""
    assert settings.broker_url is not None
    where = location(settings.broker_url)
    opened = ExitStack()
    try:
        connection = opened.enter_context(amqp_connection(settings.broker_url, timeout=timeout))
    except pika.exceptions.AMQPError as exc:
        reason = describe_error(exc) or "refused"
        raise CheckFailed(f"RabbitMQ at {where} does not answer: {reason}") from None
    with opened:
        yield connection, where


def check_rabbitmq(settings: Settings, timeout: float) -> str:
    """The broker accepts a connection; the service's queues are listed with their ready messages."""
    with _connection(settings, timeout) as (connection, where):
        states = queue_states(connection, QUEUES)
    described = ", ".join(
        f"{queue} {state.message_count} ready" if state is not None else f"{queue} not declared yet"
        for queue, state in states.items()
    )
    return f"RabbitMQ at {where} answers ({described})"


def check_rabbitmq_workers(settings: Settings, timeout: float) -> str:
    """Every queue a worker must take from has at least one consumer."""
    with _connection(settings, timeout) as (connection, where):
        try:
            states = queue_states(connection, CONSUMED_QUEUES)
        except pika.exceptions.AMQPError as exc:
            reason = describe_error(exc)
            raise CheckFailed(f"cannot read the queues on RabbitMQ at {where}: {reason}") from None
    counts = {queue: state.consumer_count if state is not None else 0 for queue, state in states.items()}
    idle = [queue for queue, count in counts.items() if count == 0]
    if idle:
        raise CheckFailed(f"no live worker on RabbitMQ at {where}: no consumer on {', '.join(idle)}")
    listed = ", ".join(f"{count} on {queue}" for queue, count in counts.items())
    return f"live workers on RabbitMQ at {where}: consumers {listed}"
