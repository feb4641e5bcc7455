"""What Redis and Dramatiq raise when the broker cannot be used, and how to say so."""

from __future__ import annotations

import dramatiq.errors
import pika.exceptions
import redis

#: The broker cannot be reached, or Redis answered and refused the command (a
#: database index it does not have, a read-only replica): nothing was queued.
#: pika's errors: what the service does on RabbitMQ without Dramatiq (reading and
#: removing dead-letter copies) meets them unwrapped.
BROKER_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ResponseError,
    dramatiq.errors.BrokerConnectionError,
    pika.exceptions.AMQPError,
)


def broker_problem(error: BaseException) -> str:
    """What went wrong, in a few words and never a URL: ``cannot be reached (ConnectionError)``."""
    if isinstance(error, redis.ResponseError):
        return f"refused the command ({str(error).splitlines()[0][:200]})"
    return f"cannot be reached ({type(error).__name__})"
