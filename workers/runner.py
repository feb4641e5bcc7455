"""Running the Dramatiq worker for all queues."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from workers import embedded_redis
from workers.database import dispose_engines, get_engine
from workers.middleware.metrics import MULTIPROC_DIR_ENV
from workers.ops.exporter import prepare_metrics_dir, start_endpoint
from workers.settings import Settings, get_settings


def tuning_environment(settings: Settings, *, processes: int) -> dict[str, str]:
    """Variables the worker processes read at start-up to tune themselves."""
    env = {
        # Read by Dramatiq's worker module on import: a quiet queue is polled this often.
        "dramatiq_worker_timeout": str(settings.worker_timeout_ms),
    }
    if settings.argon2_max_concurrent is None:
        # One hash at a time per core across the worker processes: more only adds memory.
        env["ARGON2_MAX_CONCURRENT"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def exec_worker(*, processes: int, threads: int) -> NoReturn:
    """Replace this process with ``dramatiq actors`` (Dramatiq supervises the workers).

    The embedded Redis and the tables are made ready first, so the worker
    processes do not all race to create them.
    """
    settings = get_settings()
    env = dict(os.environ)
    if not settings.redis_url:
        url, _ = embedded_redis.ensure_running(settings.data_dir)
        env["REDIS_URL"] = url
    get_engine()
    dispose_engines()
    # Metrics: each worker process writes its counters to a file of its own in
    # METRICS_DIR. prometheus_client picks that mode when it is imported, so the
    # variable is set before any worker process exists.
    metrics_dir = settings.effective_metrics_dir
    prepare_metrics_dir(metrics_dir)
    env[MULTIPROC_DIR_ENV] = str(metrics_dir)
    env["dramatiq_prom_db"] = str(metrics_dir)
    # Started before Dramatiq: one endpoint for all the worker processes, a child of this process.
    start_endpoint(settings, env)
    env.update(tuning_environment(settings, processes=processes))
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        "actors",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    ]
    if settings.log_level == "DEBUG":
        # The worker logs at INFO (Dramatiq's default); LOG_LEVEL=DEBUG makes it verbose too.
        argv.append("--verbose")
    os.execve(sys.executable, argv, env)  # noqa: S606 - argv list, no shell
