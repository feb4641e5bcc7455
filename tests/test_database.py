"""The engine cache: one engine and one schema check per database and process."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import bindparam, inspect, text

import workers.database as database
from models.types import UTCDateTime, utc_now
from tests.conftest import database_of_its_own
from tests.support import recorded_statements

#: Worker threads of one process asking for the engine together, as they do at start.
THREADS = 8


def test_threads_asking_at_once_create_the_schema_once(tmp_path, monkeypatch):
    created: list[str] = []
    real_create_tables = database.create_tables

    def slow_create_tables(engine: Any) -> None:
        created.append(str(engine.url))
        # Long enough for every other thread to reach the check meanwhile.
        time.sleep(0.2)
        real_create_tables(engine)

    monkeypatch.setattr(database, "create_tables", slow_create_tables)
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    start = threading.Barrier(THREADS)
    engines: list[Any] = []

    def ask() -> None:
        start.wait()
        engines.append(database.get_engine(url))

    threads = [threading.Thread(target=ask) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(created) == 1, created
        assert len(engines) == THREADS and all(engine is engines[0] for engine in engines)
        assert {"contracts", "accounts", "email_deliveries"} <= set(inspect(engines[0]).get_table_names())
    finally:
        engines[0].dispose()


@pytest.mark.usefixtures("database")  # the fixture, not the module: it sets DATABASE_URL
def test_autocommit_writes_are_final_at_once_on_postgresql_and_at_the_end_on_sqlite():
    """``autocommit``: each statement commits on its own (PostgreSQL: no BEGIN/COMMIT round
    trips); on SQLite, whose transactions begin IMMEDIATE, the block is one transaction."""
    url = os.environ["DATABASE_URL"]
    kind = url.split(":")[0].split("+")[0]
    engine = database.get_engine(url)
    workspace = f"ws-{uuid.uuid4().hex[:10]}"
    # The column's type converts the timestamp (sqlite3's own datetime adapter is deprecated).
    insert = text("INSERT INTO workspaces (id, created_at, updated_at) VALUES (:id, :now, :now)").bindparams(
        bindparam("now", type_=UTCDateTime())
    )
    count = text("SELECT COUNT(*) FROM workspaces WHERE id = :id")

    def committed() -> int:
        # A plain DBAPI connection: on SQLite, a read outside SQLAlchemy's "begin"
        # (BEGIN IMMEDIATE) is not blocked by the block's write lock (WAL).
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            placeholder = "?" if kind == "sqlite" else "%s"
            cursor.execute(f"SELECT COUNT(*) FROM workspaces WHERE id = {placeholder}", (workspace,))
            row = cursor.fetchone()
            assert row is not None
            return int(row[0])
        finally:
            raw.close()

    with database.autocommit(url) as connection:
        connection.execute(insert, {"id": workspace, "now": utc_now()})
        seen_inside = committed()
    seen_after = committed()
    assert (seen_inside, seen_after) == ((1, 1) if kind == "postgresql" else (0, 1))
    # Back in the pool, the connection begins transactions again.
    with engine.connect() as connection:
        connection.execute(insert, {"id": workspace + "-2", "now": utc_now()})
        connection.rollback()
        assert connection.execute(count, {"id": workspace + "-2"}).scalar_one() == 0


def _statements_of(engine: Any, call: Any) -> list[str]:
    """The SQL ``call()`` sends on ``engine``, transaction control (BEGIN) left out."""
    with recorded_statements(engine) as seen:
        call()
    return [sent.statement for sent in seen if not sent.statement.startswith("BEGIN")]


@pytest.mark.usefixtures("database")  # the fixture, not the module: it sets DATABASE_URL
def test_a_current_schema_is_checked_in_one_query_without_the_schema_lock(tmp_path):
    """Every process start checks the schema: up to date, one catalogue query, no lock to queue
    on; a missing index or column takes the long way, which adds it."""
    with database_of_its_own(os.environ["DATABASE_URL"], tmp_path / "schema.db") as url:
        engine = database.get_engine(url)
        catalogue = database._CATALOGUE_QUERIES[engine.dialect.name]
        assert _statements_of(engine, lambda: database.create_tables(engine)) == [catalogue]

        with engine.begin() as connection:
            connection.execute(text("DROP INDEX ix_contracts_status"))
            connection.execute(text("ALTER TABLE contracts DROP COLUMN cancel_reason"))
        with engine.connect() as connection:
            assert not database.schema_is_current(connection)
        long_way = _statements_of(engine, lambda: database.create_tables(engine))
        assert catalogue in long_way and len(long_way) > 10
        assert any("pg_advisory_xact_lock" in statement for statement in long_way) == (
            engine.dialect.name == "postgresql"
        )
        inspector = inspect(engine)
        assert "ix_contracts_status" in {index["name"] for index in inspector.get_indexes("contracts")}
        assert "cancel_reason" in {column["name"] for column in inspector.get_columns("contracts")}
        with engine.connect() as connection:
            assert database.schema_is_current(connection)


@pytest.fixture
def silent_postgresql(monkeypatch: pytest.MonkeyPatch) -> Any:
    """DATABASE_URL at a port that accepts connections and never answers (a hung server)."""
    from workers.settings import reset_settings

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres:do-not-print@127.0.0.1:{port}/test")
        monkeypatch.setattr(database, "DATABASE_CONNECT_TIMEOUT_SECONDS", 1)
        reset_settings()
        try:
            yield port
        finally:
            monkeypatch.undo()
            reset_settings()


def test_the_api_gives_up_on_a_database_that_never_answers_with_its_own_error(silent_postgresql):
    """libpq waits forever for a server that accepts and never answers: each call would hang.

    The call gets ``DatabaseUnavailable`` (a ``TransientError``), not the driver's error.
    """
    from contract_dispatch import DatabaseUnavailable, contract_status, send_contract
    from tests.support import contract_payload

    calls = {
        "send_contract": lambda: send_contract(**contract_payload()),
        "contract_status": lambda: contract_status("c-anything"),
    }
    # A thread of its own, left behind if it hangs: the test fails instead of stopping the run.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(calls))
    try:
        for name, call in calls.items():
            error = pool.submit(call).exception(timeout=60)
            assert isinstance(error, DatabaseUnavailable), (name, repr(error))
            assert str(error) == "the database cannot be reached (ConnectionTimeout); nothing more was done"
            assert error.__cause__ is None and "do-not-print" not in repr(error)
    finally:
        pool.shutdown(wait=False)
