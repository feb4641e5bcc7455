"""The worker's Prometheus endpoint, and what ``contract-dispatch metrics`` prints.

One scrape is one registry read at that moment:

- the counters and histograms every worker process wrote to METRICS_DIR
  (Dramatiq's ``dramatiq_*`` figures and the service's ``contract_dispatch_*``
  ones, see ``workers.ops.metrics``), added up by prometheus_client's
  multiprocess collector. The directory is emptied when the worker starts (but
  for the files of processes still running), so counters start from zero with
  each worker run; the live gauges of a process
  that died without cleaning up (SIGKILL) are dropped at the next scrape, while
  its counters stay (what it did happened);
- gauges read from a fresh ``Snapshot`` (``workers.ops.snapshot``): queue depth
  per queue and state, oldest ready message age, dead letters per actor, live
  workers, contracts by status, the last reminder sweep. They describe the whole
  system (every worker reads the same Redis and database), not this worker.

``contract-dispatch worker`` starts this module as a process of its own (``python
-m workers.ops.exporter``) before it hands over to Dramatiq, so there is one
endpoint per worker, whatever its number of processes, and it exists as long as
the worker does: it stops on SIGTERM or SIGINT (a process group stopped as a whole)
and when the process that started it is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from models.messages import (
    BROKER_MAINTENANCE_ACTOR,
    EXPIRE_ACCESS_CODES_ACTOR,
    CancelContract,
    DeliverEmail,
    DeliverEmailGroup,
    NotifySignatories,
    SendContract,
    SweepReminders,
)
from workers.dead_letters import MALFORMED_ACTOR
from workers.middleware.metrics import MULTIPROC_DIR_ENV
from workers.ops.snapshot import QUEUE_STATES, Snapshot
from workers.settings import Settings, get_settings

#: Every actor, whose dead letters are exported even when there are none: a series that
#: first appears at 1 has not increased for Prometheus (``delta``, ``increase``), so the
#: alert on new dead letters would miss an actor's first ones.
DEAD_LETTER_ACTORS = (
    SendContract.actor_name,
    SendContract.bulk_actor_name,
    NotifySignatories.actor_name,
    CancelContract.actor_name,
    SweepReminders.actor_name,
    DeliverEmail.actor_name,
    DeliverEmailGroup.actor_name,
    BROKER_MAINTENANCE_ACTOR,
    EXPIRE_ACCESS_CODES_ACTOR,
    MALFORMED_ACTOR,
)

logger = logging.getLogger(__name__)

#: Every gauge name the snapshot collector exports.
GAUGE_NAMES = (
    "contract_dispatch_queue_messages",
    "contract_dispatch_queue_oldest_ready_age_seconds",
    "contract_dispatch_dead_letters",
    "contract_dispatch_live_workers",
    "contract_dispatch_registered_workers",
    "contract_dispatch_queue_consumers",
    "contract_dispatch_contracts",
    "contract_dispatch_last_reminder_sweep_timestamp_seconds",
    "contract_dispatch_snapshot_source_up",
)

#: A file prometheus_client's multiprocess mode writes: ``{type}_{pid}.db``.
METRIC_FILE = re.compile(r"^(?:counter|histogram|summary|gauge_[a-z]+)_(?P<pid>\d+)\.db$")

#: A live gauge's file (``gauge_livesum_1234.db``): its values count only while its process lives.
LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]*_(?P<pid>\d+)\.db$")

#: How often the endpoint checks that the worker that started it is still there, in seconds.
PARENT_CHECK_SECONDS = 1.0


class WorkerFiles:
    """The worker processes' metric files, summed; first forgets the live gauges of dead processes."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._files = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        forget_dead_processes(self._directory)
        yield from self._files.collect()  # type: ignore[no-untyped-call]


def forget_dead_processes(directory: Path) -> list[int]:
    """Delete the live-gauge files of processes that are gone; return their pids.

    Dramatiq does this itself when a worker process stops normally; a process
    killed outright would otherwise count its in-progress messages forever.
    """
    dead = set()
    for path in directory.glob("gauge_live*.db"):
        match = LIVE_GAUGE_FILE.match(path.name)
        if match is not None and not _alive(int(match["pid"])):
            dead.add(int(match["pid"]))
    for pid in sorted(dead):
        with contextlib.suppress(FileNotFoundError):
            mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Someone else's process: alive (METRICS_DIR is meant for one worker's processes).
        return True
    return True


class SnapshotCollector:
    """Gauges read from one snapshot per scrape."""

    def __init__(self, take: Callable[[], Snapshot] | None = None) -> None:
        self._take = take

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._take is not None:
            snapshot = self._take()
        else:
            from workers.ops.snapshot import take_snapshot
            from workers.settings import get_settings

            snapshot = take_snapshot(database_max_age_ms=get_settings().metrics_database_max_age_ms)
        yield from snapshot_gauges(snapshot)


def snapshot_gauges(snapshot: Snapshot) -> Iterator[GaugeMetricFamily]:
    """The gauges of one snapshot; a part it could not read is left out and its source is down."""
    broker_down = any(error.startswith("broker") for error in snapshot.errors)
    database_down = any(error.startswith("database") for error in snapshot.errors)
    up = GaugeMetricFamily(
        "contract_dispatch_snapshot_source_up",
        "1 when the source of these gauges (broker or database) could be read at this scrape, else 0.",
        labels=["source"],
    )
    up.add_metric(["broker"], 0.0 if broker_down else 1.0)
    up.add_metric(["database"], 0.0 if database_down else 1.0)
    yield up
    if not broker_down:
        depth = GaugeMetricFamily(
            "contract_dispatch_queue_messages",
            "Messages per queue and state: ready (waiting for a worker), delayed (waiting for a "
            "retry or an eta), in_flight (fetched, not acknowledged), dead (in the dead-letter queue).",
            labels=["queue", "state"],
        )
        age = GaugeMetricFamily(
            "contract_dispatch_queue_oldest_ready_age_seconds",
            "Age of the oldest ready message of each queue, in seconds (0 when none is ready).",
            labels=["queue"],
        )
        on_rabbitmq = snapshot.broker == "rabbitmq"
        for queue in snapshot.queues:
            for state in QUEUE_STATES:
                # A figure the broker does not tell (RabbitMQ's in flight) is left out, not 0.
                value = getattr(queue, state)
                if value is not None:
                    depth.add_metric([queue.name, state], float(value))
            if not on_rabbitmq:
                age.add_metric([queue.name], queue.oldest_ready_age_seconds or 0.0)
        yield depth
        if not on_rabbitmq:
            yield age
        yield GaugeMetricFamily(
            "contract_dispatch_live_workers",
            "Worker processes alive: last broker heartbeat within the heartbeat timeout (Redis), "
            "or the fewest consumers on the queues every worker takes from (RabbitMQ).",
            value=float(snapshot.live_workers),
        )
        if on_rabbitmq:
            consumers = GaugeMetricFamily(
                "contract_dispatch_queue_consumers",
                "Consumers of each queue, as RabbitMQ counts them (one per live worker process).",
                labels=["queue"],
            )
            for queue in snapshot.queues:
                consumers.add_metric([queue.name], float(queue.consumers or 0))
            yield consumers
        # On RabbitMQ the registry is read from Redis apart: no made-up 0 when it could not be.
        if not any(error.startswith("registry") for error in snapshot.errors):
            yield GaugeMetricFamily(
                "contract_dispatch_registered_workers",
                "Worker processes registered in Redis, alive or silent.",
                value=float(len(snapshot.workers)),
            )
    if not database_down:
        dead = GaugeMetricFamily(
            "contract_dispatch_dead_letters",
            "Dead letters kept in SQL (not retried, not purged), per actor.",
            labels=["actor"],
        )
        counts = {actor: 0 for actor in DEAD_LETTER_ACTORS} | snapshot.dead_letters
        for actor, count in sorted(counts.items()):
            dead.add_metric([actor], float(count))
        yield dead
        contracts = GaugeMetricFamily(
            "contract_dispatch_contracts", "Contracts per status.", labels=["status"]
        )
        for status, count in sorted(snapshot.contracts.items()):
            contracts.add_metric([status], float(count))
        yield contracts
        if snapshot.last_sweep is not None:
            started = datetime.fromisoformat(snapshot.last_sweep["started_at"])
            yield GaugeMetricFamily(
                "contract_dispatch_last_reminder_sweep_timestamp_seconds",
                "When the last reminder sweep started, in seconds since the epoch.",
                value=started.timestamp(),
            )


def scrape_registry(
    metrics_dir: Path | None, *, take: Callable[[], Snapshot] | None = None
) -> CollectorRegistry:
    """The registry one scrape reads: the worker processes' files (when there are any) and the gauges."""
    registry = CollectorRegistry()
    if metrics_dir is not None and metrics_dir.is_dir():
        registry.register(WorkerFiles(metrics_dir))
    registry.register(SnapshotCollector(take))
    return registry


def render(registry: CollectorRegistry) -> str:
    """One scrape in Prometheus's text exposition format."""
    return generate_latest(registry).decode("utf-8")


def prepare_metrics_dir(directory: Path) -> None:
    """Create METRICS_DIR and delete what the last run left (prometheus_client requires a clean start).

    Only prometheus_client's own files are deleted, never the directory nor anything
    else in it (METRICS_DIR pointed at DATA_DIR must not take the SQLite database
    along), and only those of processes that are gone: a live process keeps writing
    to the file it opened, so deleting it would lose that worker's counts for good
    (another worker still running on the directory: a restart overlapping the old
    worker's exit, or two workers on one port by mistake).
    """
    directory.mkdir(parents=True, exist_ok=True)
    kept: set[int] = set()
    for path in directory.glob("*.db"):
        found = METRIC_FILE.match(path.name)
        if found is None:
            continue
        pid = int(found.group("pid"))
        if _alive(pid):
            kept.add(pid)
        else:
            path.unlink(missing_ok=True)
    if kept:
        logger.warning(
            "METRICS_DIR %s holds the metric files of running processes %s (another worker?): "
            "kept, and summed with this worker's.",
            directory,
            ", ".join(str(pid) for pid in sorted(kept)),
        )


def start_endpoint(settings: Settings, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Start the endpoint process for a worker about to start (None when METRICS_PORT is 0)."""
    if settings.metrics_port == 0:
        return None
    # The endpoint reads METRICS_DIR and writes nothing there: without these variables
    # its broker (used for the gauges) has no Prometheus middleware of its own.
    child_env = {
        name: value for name, value in env.items() if name not in (MULTIPROC_DIR_ENV, "dramatiq_prom_db")
    }
    child_env["CONTRACT_DISPATCH_METRICS_PARENT"] = str(os.getpid())
    return subprocess.Popen(
        [sys.executable, "-m", "workers.ops.exporter"], env=child_env, stdin=subprocess.DEVNULL
    )


def serve(settings: Settings) -> int:
    """Serve ``/metrics`` until SIGTERM, SIGINT or the worker that started it is gone."""
    directory = settings.effective_metrics_dir
    directory.mkdir(parents=True, exist_ok=True)
    registry = scrape_registry(directory)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = int(os.environ.get("CONTRACT_DISPATCH_METRICS_PARENT") or os.getppid())

    def running() -> bool:
        # A worker killed with SIGKILL alone cannot stop us: notice it is gone instead.
        return not stop.wait(PARENT_CHECK_SECONDS) and os.getppid() == parent

    listening = _listen(settings, registry, running)
    if listening is None:
        return 0
    server, thread = listening
    logger.info(
        "Metrics endpoint on http://%s:%s/metrics (worker metric files in %s).",
        settings.metrics_host,
        settings.metrics_port,
        directory,
    )
    while running():
        pass
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    return 0


def _listen(
    settings: Settings, registry: CollectorRegistry, running: Callable[[], bool]
) -> tuple[WSGIServer, threading.Thread] | None:
    """Start the HTTP server; while the port is taken, try again every ``PARENT_CHECK_SECONDS``.

    A worker restarted at once finds the port still held by the old worker's
    endpoint for a moment: it takes it over as soon as it is free, instead of
    running without an endpoint. None when ``running()`` turns false first.
    """
    told = False
    while True:
        try:
            return start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
        except OSError as error:
            if not told:
                logger.error(
                    "Metrics endpoint not started yet: cannot listen on %s:%s (METRICS_HOST, "
                    "METRICS_PORT): %s; trying again every %.0f s",
                    settings.metrics_host,
                    settings.metrics_port,
                    error,
                    PARENT_CHECK_SECONDS,
                )
                told = True
        if not running():
            return None


def main() -> int:
    from workers.logs import configure_logging

    settings = get_settings()
    configure_logging("INFO", settings.log_format)
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
