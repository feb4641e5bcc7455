"""What Redis and Dramatiq raise when the broker cannot be used, and how to say so."""

from __future__ import annotations

import dramatiq.errors
import pika.exceptions
import redis
from pika.adapters.utils.connection_workflow import AMQPConnectorException

#: The broker cannot be reached, or Redis answered and refused the command (a
#: database index it does not have, a read-only replica): nothing was queued.
#: pika's errors: what the service does on RabbitMQ without Dramatiq (reading and
#: removing dead-letter copies) meets them unwrapped; ``AMQPConnectorException``
#: is what pika raises, outside its ``AMQPError`` tree, for a server that accepts
#: the TCP connection and never completes the AMQP handshake.
BROKER_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ResponseError,
    dramatiq.errors.BrokerConnectionError,
    pika.exceptions.AMQPError,
    AMQPConnectorException,
)


class BatchMaybeQueued(dramatiq.errors.ConnectionClosed):
    """No attempt to enqueue a batch got through, and one went unanswered after it was sent:
    the broker may have queued the whole batch (never part of it)."""


#: AMQP reply codes of a connection RabbitMQ refused: bad credentials or rights, an unknown vhost.
_AMQP_REFUSALS = (403, 530)

#: What pika raises when RabbitMQ closed the handshake at the login or at the vhost, and what to check.
AMQP_HANDSHAKE_REFUSALS: dict[type[Exception], str] = {
    pika.exceptions.ProbableAuthenticationError: "check the user and password",
    pika.exceptions.ProbableAccessDeniedError: "check the vhost and the user's rights on it",
}


def broker_problem(error: BaseException) -> str:
    """What went wrong, in a few words and never a URL: ``cannot be reached (ConnectionError)``."""
    if isinstance(error, redis.ResponseError):
        return f"refused the command ({str(error).splitlines()[0][:200]})"
    # Dramatiq's ConnectionClosed carries pika's error, which says why.
    cause = (
        getattr(error, "message", None) if isinstance(error, dramatiq.errors.BrokerConnectionError) else None
    )
    for refusal, advice in AMQP_HANDSHAKE_REFUSALS.items():
        if isinstance(cause, refusal):
            return f"refused the connection ({type(cause).__name__}: {advice})"
    if isinstance(cause, pika.exceptions.ConnectionClosedByBroker) and cause.reply_code in _AMQP_REFUSALS:
        return f"refused the connection ({cause.reply_code} {cause.reply_text[:200]})"
    return f"cannot be reached ({type(error).__name__})"
