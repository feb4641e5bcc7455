"""Running the Dramatiq worker for all queues."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from workers import embedded_redis
from workers.database import dispose_engines, get_engine
from workers.settings import get_settings


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
    os.execve(sys.executable, argv, env)  # noqa: S606 - argv list, no shell
