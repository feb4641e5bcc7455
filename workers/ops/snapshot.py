"""One snapshot of everything ops watch, read from Redis and the database at one moment.

The broker figures come from one Lua script, so they are consistent with each
other (Redis runs a script atomically): per queue, messages ready, delayed
(waiting for a retry), in flight (fetched by a worker, not acknowledged) and
dead-lettered, and the age of the oldest ready message; and every worker's last
heartbeat. The database gives emails sent and failed by kind over the last hour
and day, contracts by status, dead letters by actor and the last reminder sweep.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func
from sqlmodel import Session, col, select

from models.contract import Contract
from models.dead_letter import DeadLetter, DeadLetterStatus
from models.delivery import DeliveryStatus, EmailDelivery
from models.reminders import ReminderSweep
from models.types import utc_now

#: The service's queues, in the order they are shown.
QUEUES = ("contracts", "contracts-bulk", "emails", "maintenance")

#: The queues a worker must consume for contracts to get sent.
CONSUMED_QUEUES = ("contracts", "contracts-bulk", "emails")

#: The same, as a reader is told: "contracts, contracts-bulk and emails".
CONSUMED_QUEUES_TEXT = ", ".join(CONSUMED_QUEUES[:-1]) + " and " + CONSUMED_QUEUES[-1]

#: How long reading the broker's figures may take, in seconds.
BROKER_READ_TIMEOUT_SECONDS = 5.0


def no_database_figures() -> dict[str, Any]:
    """The database figures of a snapshot whose database could not be read."""
    return {"emails": {}, "contracts": {}, "dead_letters": {}, "last_sweep": None}


#: The parts of ``database_figures``.
DATABASE_FIGURE_NAMES = frozenset(no_database_figures())


def shared_database_figures_key(namespace: str) -> str:
    """Where a metrics endpoint leaves the database figures it read for the others (JSON, expiring)."""
    # Imported here: the history module reads this one's constants.
    from workers.ops.history import stats_prefix

    return f"{stats_prefix(namespace)}:database_figures"


#: A queue's messages by state, as ``QueueFigures`` names them (and in this order everywhere:
#: the exporter's ``state`` label, the history's depth samples, the page's chart).
QUEUE_STATES = ("ready", "delayed", "in_flight", "dead")

#: Windows over which email outcomes are counted.
WINDOWS = {"last_hour": timedelta(hours=1), "last_day": timedelta(days=1)}


@dataclass
class QueueFigures:
    """One queue's messages by state."""

    name: str
    ready: int
    delayed: int
    #: None where the broker does not tell (RabbitMQ counts unacknowledged messages
    #: only through its management plugin).
    in_flight: int | None
    dead: int
    #: Age of the oldest ready message, in seconds (None when none is ready, or
    #: where the broker does not tell: RabbitMQ).
    oldest_ready_age_seconds: float | None
    #: Worker processes consuming the queue, where the broker counts them
    #: (RabbitMQ); None on Redis, where ``Snapshot.workers`` lists the workers.
    consumers: int | None = None


@dataclass
class WorkerFigures:
    """One registered worker process and its last broker heartbeat."""

    worker_id: str
    host: str
    pid: int | None
    #: None when the broker has no heartbeat left for it (maintenance buried it).
    last_heartbeat: datetime | None
    #: Seconds since its last heartbeat.
    silent_seconds: float | None
    alive: bool


@dataclass
class Snapshot:
    """Everything ``contract-dispatch status`` shows."""

    taken_at: datetime
    queues: list[QueueFigures]
    workers: list[WorkerFigures]
    #: {window: {kind: {"sent": n, "failed": n}}}
    emails: dict[str, dict[str, dict[str, int]]]
    contracts: dict[str, int]
    dead_letters: dict[str, int]
    last_sweep: dict[str, Any] | None
    errors: list[str] = field(default_factory=list)
    #: Where the queue figures come from: "redis", or "rabbitmq" (BROKER_URL=amqp://…).
    broker: str = "redis"

    @property
    def live_workers(self) -> int:
        """Worker processes alive: heartbeats within the timeout (Redis), or consuming every
        queue a worker must (RabbitMQ: the fewest consumers on those queues; when RabbitMQ
        could not be read, the registry's heartbeats in Redis, which workers keep there too)."""
        if self.broker == "rabbitmq" and self.queues:
            consumers = {queue.name: queue.consumers or 0 for queue in self.queues}
            return min(consumers.get(name, 0) for name in CONSUMED_QUEUES)
        return sum(1 for worker in self.workers if worker.alive)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["taken_at"] = self.taken_at.isoformat()
        for worker in data["workers"]:
            if worker["last_heartbeat"] is not None:
                worker["last_heartbeat"] = worker["last_heartbeat"].isoformat()
        data["live_workers"] = self.live_workers
        return data


@functools.cache
def _script_source() -> str:
    return (Path(__file__).with_name("snapshot.lua")).read_text()


def broker_figures(
    client: Any, namespace: str, *, heartbeat_timeout_ms: int, now: datetime, queues: tuple[str, ...] = QUEUES
) -> tuple[list[QueueFigures], list[WorkerFigures]]:
    """Queue and worker figures, read atomically."""
    raw = client.eval(_script_source(), 1, namespace, *queues)
    now_ms = now.timestamp() * 1000
    figures = []
    for name, ready, delayed, in_flight, dead, oldest in raw[:-2]:
        oldest_ms = float(oldest)
        figures.append(
            QueueFigures(
                name=_text(name),
                ready=int(ready),
                delayed=int(delayed),
                in_flight=int(in_flight),
                dead=int(dead),
                oldest_ready_age_seconds=max((now_ms - oldest_ms) / 1000, 0.0) if oldest_ms >= 0 else None,
            )
        )
    heartbeats = {_text(k): float(v) for k, v in zip(raw[-2][::2], raw[-2][1::2], strict=True)}
    workers = []
    # Only registered workers count: producers heartbeat as they enqueue.
    for worker_id, info_json in zip(raw[-1][::2], raw[-1][1::2], strict=True):
        worker_id = _text(worker_id)
        try:
            info = json.loads(info_json)
        except ValueError:
            info = {}
        score = heartbeats.get(worker_id)
        silent = max((now_ms - score) / 1000, 0.0) if score is not None else None
        workers.append(
            WorkerFigures(
                worker_id=worker_id,
                host=str(info.get("host", "?")),
                pid=info.get("pid"),
                last_heartbeat=datetime.fromtimestamp(score / 1000, now.tzinfo)
                if score is not None
                else None,
                silent_seconds=silent,
                alive=silent is not None and silent * 1000 < heartbeat_timeout_ms,
            )
        )
    workers.sort(key=lambda worker: (not worker.alive, worker.silent_seconds or 0.0))
    return figures, workers


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def database_figures(session: Session, *, now: datetime) -> dict[str, Any]:
    """Email outcomes, contracts by status, dead letters by actor, the last sweep."""
    emails: dict[str, dict[str, dict[str, int]]] = {}
    for window, span in WINDOWS.items():
        since = now - span
        counts: dict[str, dict[str, int]] = {}
        sent = session.exec(
            select(EmailDelivery.kind, func.count())
            .where(EmailDelivery.status == DeliveryStatus.SENT.value, col(EmailDelivery.sent_at) >= since)
            .group_by(EmailDelivery.kind)
        )
        for kind, count in sent:
            counts.setdefault(kind, {"sent": 0, "failed": 0})["sent"] = count
        failed = session.exec(
            select(EmailDelivery.kind, func.count())
            .where(
                EmailDelivery.status == DeliveryStatus.FAILED.value, col(EmailDelivery.updated_at) >= since
            )
            .group_by(EmailDelivery.kind)
        )
        for kind, count in failed:
            counts.setdefault(kind, {"sent": 0, "failed": 0})["failed"] = count
        emails[window] = counts
    contracts = {
        status: count
        for status, count in session.exec(select(Contract.status, func.count()).group_by(Contract.status))
    }
    dead = {
        actor: count
        for actor, count in session.exec(
            select(DeadLetter.actor_name, func.count())
            .where(DeadLetter.status == DeadLetterStatus.DEAD.value)
            .group_by(DeadLetter.actor_name)
        )
    }
    sweep = session.exec(
        select(ReminderSweep).order_by(col(ReminderSweep.started_at).desc()).limit(1)
    ).first()
    last_sweep = None
    if sweep is not None:
        last_sweep = {
            "started_at": sweep.started_at.isoformat(),
            "as_of": sweep.as_of.isoformat(),
            "finished_at": sweep.finished_at.isoformat() if sweep.finished_at else None,
            "claimed": sweep.claimed,
            "postponed": sweep.postponed,
            "lost_races": sweep.lost_races,
            "codes_renewed": sweep.codes_renewed,
            "redriven": sweep.redriven,
            "error": sweep.error,
        }
    return {"emails": emails, "contracts": contracts, "dead_letters": dead, "last_sweep": last_sweep}


def shared_database_figures(client: Callable[[], redis.Redis], namespace: str) -> dict[str, Any] | None:
    """The database figures an endpoint read within the max age, or None (none left, or unreadable).

    ``client`` makes (or returns) the Redis client; a URL it cannot use is unreadable too.
    """
    try:
        raw = client().get(shared_database_figures_key(namespace))
        figures = json.loads(raw) if raw is not None else None
    except (redis.RedisError, ValueError):
        # Redis's own trouble is the broker figures' to report; this scrape reads the database.
        return None
    if isinstance(figures, dict) and figures.keys() == DATABASE_FIGURE_NAMES:
        return figures
    return None


def share_database_figures(
    client: Callable[[], redis.Redis], namespace: str, figures: dict[str, Any], *, max_age_ms: int
) -> None:
    """Leave ``figures`` for the other endpoints for ``max_age_ms`` milliseconds (best effort)."""
    # Not left: the next scrape reads the database again.
    with contextlib.suppress(redis.RedisError, ValueError):
        client().set(shared_database_figures_key(namespace), json.dumps(figures), px=max_age_ms)


def take_snapshot(
    *, now: datetime | None = None, client: Any = None, database_max_age_ms: int = 0
) -> Snapshot:
    """Read everything now; a part that cannot be read is reported in ``errors``, not raised.

    ``client``: a Redis client to read with (one is made from the settings by default).
    No broker is built: a plain client reads, so nothing can enqueue or heartbeat.

    ``database_max_age_ms`` (a metrics endpoint's scrape): the database figures
    another endpoint read less than that many milliseconds ago are taken from Redis
    instead of the database, and figures read here are left there for as long.
    Every endpoint reports the same whole-system gauges; this reads them once per
    interval for the fleet instead of once per endpoint and scrape. 0 (``status``,
    ``metrics``): always from the database.
    """
    from workers.broker import redis_client
    from workers.database import require_database, session_scope
    from workers.ops.health import describe_error, redact, secrets_of
    from workers.settings import get_settings

    settings = get_settings()
    secrets = secrets_of(settings)

    def said(exc: BaseException) -> str:
        # One line, the driver's own error, and no password from a URL.
        return redact(describe_error(exc), secrets)

    now = now or utc_now()
    errors: list[str] = []
    queues: list[QueueFigures] = []
    workers: list[WorkerFigures] = []
    # Set when the queues live in RabbitMQ (BROKER_URL=amqp://…).
    amqp_url = settings.broker_url if settings.uses_rabbitmq else None

    @functools.cache
    def reader() -> Any:
        # One client for every read of this snapshot, made at the first (inside its try:
        # a REDIS_URL redis-py cannot parse raises here).
        return client if client is not None else redis_client(settings, start_embedded=False)

    def from_redis(queues: tuple[str, ...]) -> tuple[list[QueueFigures], list[WorkerFigures]]:
        return broker_figures(
            reader(),
            settings.redis_namespace,
            heartbeat_timeout_ms=settings.heartbeat_timeout_ms,
            now=now,
            queues=queues,
        )

    try:
        if amqp_url is not None:
            # Its consumers are the live workers.
            from workers.ops.rabbitmq_queues import rabbitmq_figures

            queues = rabbitmq_figures(amqp_url, timeout=BROKER_READ_TIMEOUT_SECONDS)
        else:
            queues, workers = from_redis(QUEUES)
    except Exception as exc:
        if amqp_url is None and not settings.redis_url:
            # Only a worker or the demo starts the embedded Redis; status never does.
            errors.append(f"broker: the embedded Redis is not running ({said(exc)})")
        else:
            errors.append(f"broker: {said(exc)}")
    if amqp_url is not None:
        # The workers still register and heartbeat in Redis (hosts and pids): no queue to read there.
        try:
            _, workers = from_redis(())
        except Exception as exc:
            errors.append(f"registry: {said(exc)}")
    figures: dict[str, Any] | None = None
    if database_max_age_ms > 0:
        figures = shared_database_figures(reader, settings.redis_namespace)
    if figures is None:
        try:
            # Reading must not create a database (and its tables) at a mistyped path.
            require_database()
            with session_scope() as session:
                figures = database_figures(session, now=now)
        except Exception as exc:
            errors.append(f"database: {said(exc)}")
            figures = no_database_figures()
        else:
            if database_max_age_ms > 0:
                share_database_figures(
                    reader, settings.redis_namespace, figures, max_age_ms=database_max_age_ms
                )
    return Snapshot(
        taken_at=now,
        queues=queues,
        workers=workers,
        errors=errors,
        broker="rabbitmq" if amqp_url is not None else "redis",
        **figures,
    )
