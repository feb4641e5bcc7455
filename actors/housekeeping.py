"""The scheduler's housekeeping jobs (queue ``maintenance``)."""

from __future__ import annotations

from typing import Any

import dramatiq

from models.messages import BROKER_MAINTENANCE_ACTOR, EXPIRE_ACCESS_CODES_ACTOR, MAINTENANCE_QUEUE
from workers import dead_letters
from workers.redis_dispatch import run_maintenance
from workers.reminders import expire_access_codes, purge_code_refusals, redrive_stale_deliveries
from workers.retry_policy import actor_options


@dramatiq.actor(
    actor_name=BROKER_MAINTENANCE_ACTOR,
    queue_name=MAINTENANCE_QUEUE,
    **actor_options(BROKER_MAINTENANCE_ACTOR),
)
def broker_maintenance(payload: dict[str, Any] | None = None) -> None:
    """Return dead workers' messages, file dead letters, re-drive emails whose message was lost.

    Every worker already does the first two on its own schedule; this job also
    covers a fleet whose workers all restarted, and lost messages.
    """
    broker = broker_maintenance.broker
    if hasattr(broker, "scripts"):
        for queue_name in sorted(broker.get_declared_queues() | broker.get_declared_delay_queues()):
            run_maintenance(broker, queue_name)  # type: ignore[arg-type]
    # On RabbitMQ (no scripts, no maintenance needed) this files reasons parked in Redis.
    dead_letters.sync(broker, broker.get_declared_queues())
    redrive_stale_deliveries()


@dramatiq.actor(
    actor_name=EXPIRE_ACCESS_CODES_ACTOR,
    queue_name=MAINTENANCE_QUEUE,
    **actor_options(EXPIRE_ACCESS_CODES_ACTOR),
)
def expire_access_codes_job(payload: dict[str, Any] | None = None) -> None:
    """Forget the hashes of expired temporary passwords, and refusal counts a day old."""
    expire_access_codes()
    purge_code_refusals()
