"""The broker and its middleware, built from settings once per process."""

from __future__ import annotations

import threading

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, Retries, default_middleware

from workers import embedded_redis
from workers.consumer import TolerantRedisConsumer
from workers.middleware import (
    BrokerMaintenance,
    DeadLetters,
    HashingThreads,
    MessageLog,
    SingleStopSignal,
    Templates,
)
from workers.middleware.metrics import Refusals, dramatiq_prometheus
from workers.rabbitmq import ServiceRabbitmqBroker
from workers.retry_policy import retry_when
from workers.settings import Settings, get_settings

#: Connecting to Redis gives up after this long, in seconds: a producer facing an
#: unreachable broker gets an error instead of hanging.
REDIS_CONNECT_TIMEOUT_SECONDS = 5.0

#: One Redis command gives up after this long, in seconds.
REDIS_SOCKET_TIMEOUT_SECONDS = 15.0

_lock = threading.Lock()
#: What ``setup_broker`` builds: both have ``namespace`` and ``client`` (which, on
#: RabbitMQ, raises AttributeError saying the queues are RabbitMQ's, not Redis's).
ServiceBroker = RedisBroker | ServiceRabbitmqBroker

_broker: ServiceBroker | None = None


class ServiceRedisBroker(RedisBroker):
    """Dramatiq's Redis broker, whose consumers dead-letter malformed messages (see workers.consumer)."""

    @property
    def consumer_class(self) -> type[TolerantRedisConsumer]:
        return TolerantRedisConsumer


def broker_url(settings: Settings) -> str:
    """The service's Redis: REDIS_URL, or the embedded server's (started if needed).

    It is the broker unless BROKER_URL names RabbitMQ; then it only coordinates
    (see workers.coordination).
    """
    if settings.redis_url:
        return settings.redis_url
    url, _ = embedded_redis.ensure_running(settings.data_dir)
    return url


def redis_client(settings: Settings, *, start_embedded: bool = True) -> redis.Redis:
    """A client of the service's Redis (REDIS_URL, or the embedded server's).

    With ``start_embedded=False`` (a command that only reads), the embedded
    server is not started: if it does not run, the client fails to connect.
    """
    url = settings.redis_url or (
        broker_url(settings) if start_embedded else embedded_redis.url_for(settings.data_dir)
    )
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
        socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
        health_check_interval=30,
    )


def build_broker(settings: Settings) -> ServiceBroker:
    """A Redis broker, or a RabbitMQ one (BROKER_URL), with the service's retry policy and middleware."""
    middleware = [m() for m in default_middleware if m is not Retries]
    prometheus = dramatiq_prometheus()
    if prometheus is not None:
        middleware.insert(0, prometheus)
    # deliver_email reads an option of the message it runs (actors.deliver_email).
    middleware.append(CurrentMessage())
    # Before Retries: its "after" hook runs once Retries has decided the message's fate.
    middleware.append(MessageLog())
    middleware.append(
        Retries(
            max_retries=settings.max_retries,
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
            retry_when=retry_when(settings.max_retries),
        )
    )
    # After Retries: their "after" hooks run before it (see DeadLetters).
    # Filing a dead deliver_email also fails its emails (workers.dead_letters.record).
    middleware.append(DeadLetters())
    middleware.append(Refusals())
    middleware.append(
        BrokerMaintenance(
            interval_ms=settings.maintenance_interval_ms,
            outage_patience_seconds=settings.redis_outage_patience_seconds,
            history_sample_interval_ms=settings.history_sample_interval_ms,
            heartbeat_timeout_ms=settings.heartbeat_timeout_ms,
        )
    )
    middleware.append(SingleStopSignal())
    middleware.append(HashingThreads(parameters=settings.hash_parameters()))
    middleware.append(Templates())
    if settings.uses_rabbitmq:
        assert settings.broker_url is not None
        return ServiceRabbitmqBroker(
            url=settings.broker_url,
            namespace=settings.redis_namespace,
            coordination=lambda: redis_client(settings),
            # Each enqueue waits for RabbitMQ's confirmation: a producer that got
            # no error knows the message is on the queue.
            confirm_delivery=True,
            middleware=middleware,
        )
    return ServiceRedisBroker(  # type: ignore[no-untyped-call]
        client=redis_client(settings),
        namespace=settings.redis_namespace,
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        # Maintenance runs on a schedule (BrokerMaintenance), not on a dice roll.
        maintenance_chance=0,
        middleware=middleware,
    )


def setup_broker() -> ServiceBroker:
    """The process's broker, set as Dramatiq's global one (actors bind to it)."""
    global _broker
    with _lock:
        if _broker is None:
            _broker = build_broker(get_settings())
            dramatiq.set_broker(_broker)
        return _broker
