"""Benchmarks: ``python -m bench`` (``make bench``) runs them all, ``python -m bench NAME`` one.

Each benchmark is a module of this package listed in ``BENCHMARKS``. It declares
its options (``add_arguments``), runs on a ``Workbench`` (a Redis server, a
namespace and databases of its own, so nothing it measures touches anything
else's data) and returns its figures, which ``python -m bench`` prints and
merges into ``bench/results.json`` under the benchmark's name.

Every speed figure is reported next to a baseline measured in the same run on
the same servers, as a ratio with the raw times beside it: raw times say little
from one machine to another, ratios to a baseline say how far from the floor the
code is.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

#: Benchmark name -> module (imported only when that benchmark runs).
BENCHMARKS: dict[str, str] = {
    "sweep": "bench.sweep",
    "pipeline": "bench.pipeline",
    "producer": "bench.producer",
    "connections": "bench.connections",
    "report": "bench.report",
}

#: Where the last run's figures are kept, one entry per benchmark.
RESULTS_PATH = Path(__file__).with_name("results.json")

#: Where PostgreSQL runs are made (trust auth); each database is a schema of its own.
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

#: The RabbitMQ server of ``--broker rabbitmq`` (a virtual host of the run's own is added).
BENCH_AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")

#: The secret key of benchmark runs (never a production value).
BENCH_SECRET_KEY = "bench-secret-key-" + "z" * 32

DatabaseKind = Literal["sqlite", "postgresql"]


def service_variables() -> frozenset[str]:
    """Every environment variable the service's settings read."""
    from workers.settings import Settings

    return frozenset(name.upper() for name in Settings.model_fields)


def postgres_reachable() -> str | None:
    """None when PostgreSQL at POSTGRES_URL answers, else why not."""
    from sqlalchemy import create_engine, text

    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        engine.dispose()


@dataclass
class Database:
    """One database of a benchmark's own: a SQLite file or a PostgreSQL schema."""

    kind: DatabaseKind
    url: str
    #: A connection URL that runs statements outside transactions (VACUUM), or None on SQLite.
    admin_url: str | None = None


class Workbench:
    """A temporary directory, a Redis server and a Redis namespace of the run's own.

    The service reads its settings from the environment: entering the workbench
    replaces every service variable (so a developer's ``.env`` or shell cannot
    leak in) and ``database()`` points ``DATABASE_URL`` at a fresh database.
    """

    def __init__(self, *, keep: bool = False) -> None:
        self.keep = keep
        self.run_id = uuid.uuid4().hex[:10]
        self.namespace = f"bench-{self.run_id}"
        self.root = Path(tempfile.mkdtemp(prefix="contract-dispatch-bench-"))
        self.redis_url = ""
        self._redis: Any = None
        self._saved_environment: dict[str, str] = {}

    def __enter__(self) -> Workbench:
        from tests.support import RedisServer

        self._redis = RedisServer(self.root / "redis").start()
        self.redis_url = self._redis.url
        for name in service_variables():
            if name in os.environ:
                self._saved_environment[name] = os.environ.pop(name)
        os.environ.update(
            {
                "DATA_DIR": str(self.root / "data"),
                "REDIS_URL": self.redis_url,
                "REDIS_NAMESPACE": self.namespace,
                "DATABASE_URL": f"sqlite:///{self.root / 'idle.db'}",
                "EMAIL_BACKEND": "file",
                "SECRET_KEY": BENCH_SECRET_KEY,
                "LOG_LEVEL": "WARNING",
            }
        )
        from workers.settings import reset_settings

        reset_settings()
        return self

    def __exit__(self, *exc: object) -> None:
        from workers.database import dispose_engines

        dispose_engines()
        if self._redis is not None:
            self._redis.stop()
        for name in service_variables():
            os.environ.pop(name, None)
        os.environ.update(self._saved_environment)
        if self.keep:
            print(f"kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    @contextmanager
    def database(self, kind: DatabaseKind, label: str) -> Iterator[Database]:
        """A fresh, empty database as the service's DATABASE_URL, dropped afterwards."""
        from sqlalchemy import create_engine, text

        from workers.database import dispose_engines
        from workers.settings import reset_settings

        drop: Callable[[], None] | None = None
        if kind == "postgresql":
            schema = f"cd_bench_{self.run_id}_{label}"
            admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
            database = Database(kind, url, admin_url=url)

            def drop() -> None:
                with admin.connect() as connection:
                    connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                admin.dispose()

        else:
            path = self.root / f"{label}.db"
            database = Database(kind, f"sqlite:///{path}")

            def drop() -> None:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)

        os.environ["DATABASE_URL"] = database.url
        reset_settings()
        try:
            yield database
        finally:
            dispose_engines()
            if not self.keep:
                drop()


@contextmanager
def service_on_rabbitmq() -> Iterator[str]:
    """The service's broker on RabbitMQ, in a virtual host of the run's own: yields its AMQP URL.

    ``BROKER_URL`` is set before the actors are imported: the process's broker is
    built from it once. A RabbitMQ that cannot give a virtual host ends the run.
    """
    import importlib

    from tests.rabbitmq_vhost import VhostUnavailable, virtual_host
    from workers.settings import reset_settings

    try:
        with virtual_host(BENCH_AMQP_URL, prefix="contract-dispatch-bench") as amqp_url:
            os.environ["BROKER_URL"] = amqp_url
            reset_settings()
            importlib.import_module("actors")
            yield amqp_url
    except VhostUnavailable as exc:
        raise SystemExit(f"RabbitMQ at {BENCH_AMQP_URL} is unusable: {exc}") from None


# -- timing and reporting ---------------------------------------------------------


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action`` took."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def seconds(value: float) -> str:
    """A duration for a human: ms below a second."""
    if value != value:  # NaN: not measured
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def against(value: float, baseline: float) -> str:
    """``value`` as a multiple of ``baseline``, with the raw figure beside it."""
    if not baseline or value != value:
        return seconds(value)
    return f"{value / baseline:5.2f} x base ({seconds(value)})"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def save_results(name: str, figures: dict[str, Any], path: Path = RESULTS_PATH) -> None:
    """Merge one benchmark's figures into the results file.

    Other benchmarks' entries stay, and so do the top-level keys of this
    benchmark's entry that ``figures`` does not replace (a run on SQLite keeps
    the last PostgreSQL figures, say).
    """
    results: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                results = loaded
        except json.JSONDecodeError:
            pass
    previous = results.get(name)
    results[name] = {**previous, **figures} if isinstance(previous, dict) else figures
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)
