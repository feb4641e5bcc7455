"""``contract-dispatch scheduler``: enqueues the periodic jobs, on APScheduler.

The scheduler only enqueues; workers do the work. Several schedulers may run at
once (two hosts, a deploy overlapping the old one): each slot of each job is
claimed in Redis with ``SET NX`` first, so one of them enqueues it. Even if two
sweeps did run, each reminder is claimed in the database, so none goes twice.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from models.messages import BROKER_MAINTENANCE_ACTOR, EXPIRE_ACCESS_CODES_ACTOR, SweepReminders
from workers.coordination import coordination_client, coordination_namespace
from workers.settings import get_settings

logger = logging.getLogger(__name__)

#: Housekeeping intervals, in seconds.
BROKER_MAINTENANCE_INTERVAL_SECONDS = 300
CODE_EXPIRY_INTERVAL_SECONDS = 3600


@dataclass(frozen=True)
class PeriodicJob:
    """One job the scheduler enqueues every ``interval`` seconds."""

    name: str
    actor_name: str
    interval: float
    payload: dict[str, Any]


def periodic_jobs() -> list[PeriodicJob]:
    """What the scheduler runs, from settings."""
    settings = get_settings()
    return [
        PeriodicJob(
            "reminder-sweep",
            SweepReminders.actor_name,
            settings.reminder_sweep_minutes * 60,
            SweepReminders().to_payload(),
        ),
        PeriodicJob("broker-maintenance", BROKER_MAINTENANCE_ACTOR, BROKER_MAINTENANCE_INTERVAL_SECONDS, {}),
        PeriodicJob("access-code-expiry", EXPIRE_ACCESS_CODES_ACTOR, CODE_EXPIRY_INTERVAL_SECONDS, {}),
    ]


def claim_slot(broker: dramatiq.Broker, job: PeriodicJob, *, now: float | None = None) -> bool:
    """Whether this scheduler is the one to enqueue ``job`` for the current interval."""
    # Redis even when RabbitMQ carries the messages (REDIS_URL): see workers.coordination.
    client = coordination_client(broker)
    if client is None:
        return True
    now = time.time() if now is None else now
    slot = int(now // job.interval)
    key = f"{coordination_namespace(broker)}:__schedule__:{job.name}:{slot}"
    return bool(client.set(key, "1", nx=True, px=int(job.interval * 2000)))


def enqueue_job(broker: dramatiq.Broker, job: PeriodicJob) -> bool:
    """Enqueue one run of ``job`` unless another scheduler already did for this slot."""
    if not claim_slot(broker, job):
        logger.debug("Job %s already enqueued for this interval by another scheduler.", job.name)
        return False
    broker.get_actor(job.actor_name).send(job.payload)
    logger.info("Enqueued %s.", job.name)
    return True


#: The signals that stop the scheduler.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def run_scheduler() -> int:
    """Run until SIGTERM or SIGINT.

    The stop signals are blocked before any thread starts (threads inherit the
    mask) and waited for by the main thread: no handler runs in the middle of
    other code (logging from one could fail on a stream it interrupted), and a
    repeated stop (a supervisor insisting, a platform signalling the whole group)
    stays pending, blocked, until the process is gone: one stop, exit 0.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    import actors

    broker = actors.broker
    scheduler = BackgroundScheduler(timezone="UTC")
    for job in periodic_jobs():
        scheduler.add_job(
            enqueue_job,
            IntervalTrigger(seconds=job.interval),
            args=[broker, job],
            id=job.name,
            # A run missed while the broker was down is run once when it is back, not many times.
            coalesce=True,
            max_instances=1,
            misfire_grace_time=int(job.interval),
            # First run at once: a scheduler that restarts often must not starve the jobs.
            next_run_time=datetime.now(UTC),
        )
    scheduler.start()
    logger.info(
        "Scheduler started: %s", ", ".join(f"{j.name} every {j.interval:g} s" for j in periodic_jobs())
    )
    signal.sigwait(STOP_SIGNALS)
    logger.info("Stopping the scheduler.")
    scheduler.shutdown(wait=False)
    return 0
