"""Test fixtures: a real Redis of the tests' own, real SQLite and PostgreSQL, a
SendGrid stand-in over HTTP, and real Dramatiq workers.

Nothing here touches data it did not create: Redis is a server started for this
session (each pytest-xdist worker process is one) on a free port, SQLite lives in
a temporary directory, and PostgreSQL tests work in a schema created for this
session and dropped at the end. PostgreSQL tests skip on a machine without a
server, except when ``CI`` is set.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from tests.sendgrid_standin import API_KEY, SendGridStandIn
from tests.support import CapturingHandler, RedisServer

#: Where the PostgreSQL tests connect (trust auth); their own schema is added.
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

#: The secret key of the test session (never a production value).
TEST_SECRET_KEY = "test-secret-key-" + "x" * 32

_state: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background job (`make test &`) with SIGINT ignored, which its
    # children inherit: the tests of Ctrl-C need it as an interpreter starts it.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        # pytest-xdist's controller runs no test: each of its worker processes is
        # a session of its own, with its own servers, started here.
        return
    root = Path(tempfile.mkdtemp(prefix="contract-dispatch-tests-"))
    redis_server = RedisServer(root / "redis").start()
    standin = SendGridStandIn().start()
    _state.update(root=root, redis=redis_server, standin=standin)
    environment = {
        "DATA_DIR": str(root / "data"),
        "REDIS_URL": redis_server.url,
        "REDIS_NAMESPACE": "dramatiq",
        "DATABASE_URL": f"sqlite:///{root / 'sqlite' / 'tests.db'}",
        "EMAIL_BACKEND": "sendgrid",
        "SENDGRID_API_KEY": API_KEY,
        "SENDGRID_API_HOST": standin.url,
        "SENDGRID_TIMEOUT": "2",
        "SECRET_KEY": TEST_SECRET_KEY,
        "APP_BASE_URL": "https://app.example.com",
        "MAIL_FROM": "contracts@example.com",
        "MIN_BACKOFF_MS": "20",
        "MAX_BACKOFF_MS": "200",
        "MAX_RETRIES": "3",
        "SEND_LEASE_SECONDS": "5",
        # Worker processes serve no Prometheus endpoint unless a test asks for one.
        "METRICS_PORT": "0",
        # Many tests refuse sends on purpose in the shared workspaces; the limit's
        # own tests (tests/test_refusal_limit.py) turn it on in workspaces of their own.
        "REFUSAL_RATE_LIMIT": "0",
    }
    os.environ.update(environment)
    _state["environment"] = environment
    from workers.settings import reset_settings

    reset_settings()


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests.processes import COMMANDS

    COMMANDS.stop()
    if "standin" in _state:
        _state["standin"].stop()
    if "redis" in _state:
        _state["redis"].stop()
    if "root" in _state:
        shutil.rmtree(_state["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def test_environment() -> dict[str, str]:
    """The environment variables the session runs with (for subprocesses)."""
    return dict(_state["environment"])


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    server: RedisServer = _state["redis"]
    return server


@pytest.fixture(scope="session")
def standin_server() -> SendGridStandIn:
    server: SendGridStandIn = _state["standin"]
    return server


@pytest.fixture
def standin(standin_server: SendGridStandIn) -> Iterator[SendGridStandIn]:
    """The SendGrid stand-in, with no scripted answers left over from other tests."""
    standin_server.script()
    yield standin_server
    standin_server.reset()


def _postgres_schema_url() -> Iterator[str]:
    schema = f"cd_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        admin.dispose()
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set but PostgreSQL at {POSTGRES_URL} is unusable: {exc}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}: {type(exc).__name__}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        from workers.database import dispose_engines

        dispose_engines()
        _drop_schema(admin, schema)
        admin.dispose()


#: Attempts at dropping a test schema (a deadlock aborts one), and the pause between them in seconds.
DROP_ATTEMPTS = 5
DROP_PAUSE_SECONDS = 0.2


def _drop_schema(admin: Engine, schema: str) -> None:
    # A thread of the session's in-process worker can still be in a transaction on
    # the schema's tables (a maintenance tick): PostgreSQL may then pick the DROP as
    # a deadlock's victim (seen with three test processes). The other side finishes.
    for attempt in range(1, DROP_ATTEMPTS + 1):
        try:
            with admin.connect() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            return
        except OperationalError:
            if attempt == DROP_ATTEMPTS:
                raise
            time.sleep(DROP_PAUSE_SECONDS)


@contextmanager
def database_of_its_own(database: str, sqlite_path: Path) -> Iterator[str]:
    """A fresh database of the same kind as ``database``, this process's DATABASE_URL while inside.

    For tests whose figures cover the whole database (sweeps, gauges, scans): a
    SQLite file at ``sqlite_path`` or a PostgreSQL schema of their own, holding
    only the workspace ``ws-main`` (resource group ``rg-1``) at the start.
    """
    from contract_dispatch import set_workspace
    from workers.database import get_engine
    from workers.settings import reset_settings

    urls = iter([f"sqlite:///{sqlite_path}"]) if database.startswith("sqlite") else _postgres_schema_url()
    url = next(urls)
    original = os.environ["DATABASE_URL"]
    os.environ["DATABASE_URL"] = url
    reset_settings()
    try:
        set_workspace("ws-main", ["rg-1"])
        yield url
    finally:
        os.environ["DATABASE_URL"] = original
        reset_settings()
        get_engine(url).dispose()
        for _ in urls:  # drops the PostgreSQL schema
            pass


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    from workers.settings import reset_settings

    original = os.environ["DATABASE_URL"]
    if request.param == "sqlite":
        url = f"sqlite:///{_state['root'] / 'sqlite' / f'{uuid.uuid4().hex[:8]}.db'}"
        urls: Iterator[str] = iter([url])
    else:
        urls = _postgres_schema_url()
    url = next(urls)
    os.environ["DATABASE_URL"] = url
    reset_settings()
    from contract_dispatch import set_workspace

    set_workspace("ws-main", ["rg-1"])
    set_workspace("ws-multi", ["paris", "lyon"])
    try:
        yield url
    finally:
        os.environ["DATABASE_URL"] = original
        reset_settings()
        for _ in urls:  # runs the PostgreSQL clean-up
            pass


@pytest.fixture(scope="session")
def broker() -> dramatiq.Broker:
    import actors

    return actors.broker


@pytest.fixture(scope="session")
def worker(database: str, broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    """A real Dramatiq worker (threads in this process) on the real Redis broker."""
    broker.flush_all()
    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=50)
    worker.start()
    yield worker
    worker.stop()
    broker.flush_all()


@pytest.fixture
def root_at_debug() -> Iterator[CapturingHandler]:
    """Every log record of this process, the root logger at DEBUG for the test."""
    root = logging.getLogger()
    handler = CapturingHandler()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.setLevel(level)
        root.removeHandler(handler)


@pytest.fixture
def private_standin() -> Iterator[SendGridStandIn]:
    """A stand-in only this test's worker talks to: its scripted answers go to its own emails."""
    server = SendGridStandIn().start()
    yield server
    server.stop()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[str]:
    """An SQLite file of this test's own, this process's DATABASE_URL while the test runs."""
    with database_of_its_own("sqlite", tmp_path / "own.db") as url:
        yield url
