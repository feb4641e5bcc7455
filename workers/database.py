"""The SQL engine: SQLite by default, PostgreSQL in production."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.pool import NullPool
from sqlmodel import Session, SQLModel, create_engine

# Importing the tables registers them on SQLModel.metadata.
from models import account, code_refusal, contract, dead_letter, delivery, reminders, workspace  # noqa: F401
from models.contract import Contract
from models.errors import DatabaseMissing, DatabaseUnavailable
from models.upsert import table_of
from workers.settings import Settings, get_settings

#: How long SQLite waits for another writer before giving up, in seconds.
SQLITE_BUSY_TIMEOUT_SECONDS = 30

#: How long opening a PostgreSQL connection may take, in seconds; a ``connect_timeout``
#: in DATABASE_URL wins. libpq waits forever: a server that accepts connections and
#: never answers (hung, or a half-open proxy) would hang every command and producer.
DATABASE_CONNECT_TIMEOUT_SECONDS = 5

#: A pooled PostgreSQL connection unused for longer than this is pinged before use, in seconds.
PING_AFTER_IDLE_SECONDS = 1.0

#: Serialises table creation between processes on PostgreSQL.
_SCHEMA_LOCK_KEY = 0x636F6E7472616374  # "contract"

_engines: dict[str, Engine] = {}
_ready: set[str] = set()
#: URLs whose tables ``require_database`` found (without creating them).
_checked: set[str] = set()
#: The engine of DATABASE_URL and the settings object it was looked up for.
_default: tuple[Settings, Engine] | None = None
_lock = threading.Lock()
#: Serialises table creation between the threads of this process.
_schema_lock = threading.Lock()

_P = ParamSpec("_P")
_R = TypeVar("_R")


def unavailable(error: OperationalError) -> DatabaseUnavailable:
    """What a caller is told of ``error``: the driver's error type, never the URL."""
    return DatabaseUnavailable(
        f"the database cannot be reached ({type(error.orig).__name__}); nothing more was done"
    )


def raising_unavailable(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """``function``, raising ``DatabaseUnavailable`` for SQLAlchemy's ``OperationalError``.

    For the producer API: its callers catch this service's errors, not the
    database driver's (whose text may name the server).
    """

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        except OperationalError as error:
            raise unavailable(error) from None

    return wrapper


def normalize_database_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` use psycopg 3 unless a driver is named."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def database_location(url: URL) -> str:
    """Where ``url`` points, for messages: never the URL itself, which may hold a password."""
    if url.get_backend_name() == "sqlite":
        return f"sqlite file {url.database}"
    server = f"{url.host or 'localhost'}:{url.port or 'default port'}"
    return f"{url.get_backend_name()} at {server}/{url.database or ''}"


def require_database(url: str | None = None) -> None:
    """Raise ``DatabaseMissing`` unless ``url`` (DATABASE_URL by default) holds this service's tables.

    Commands that only read call this first: opening a SQLite file that is not
    there creates it, and any first use creates the tables, so a mistyped path
    or database would read as an empty system (a contract "unknown", no dead
    letters) instead of an error, and leave tables in somebody else's database.
    Checked once per process and URL, on a connection of its own.
    """
    url = normalize_database_url(url or get_settings().effective_database_url)
    if url in _ready or url in _checked:
        return
    parsed = make_url(url)
    path = parsed.database
    if parsed.get_backend_name() == "sqlite" and path and path != ":memory:" and not Path(path).exists():
        raise DatabaseMissing(f"no database at {path}: nothing was ever recorded there (check DATABASE_URL)")
    # A throwaway engine: get_engine would create the tables it is looking for.
    engine = create_engine(url, poolclass=NullPool, connect_args=_connect_args(parsed))
    try:
        with engine.connect() as connection:
            found = inspect(connection).has_table(table_of(Contract).name)
    finally:
        engine.dispose()
    if not found:
        raise DatabaseMissing(
            f"no contract-dispatch tables in {database_location(parsed)} (check DATABASE_URL)"
        )
    _checked.add(url)


def _connect_args(url: URL) -> dict[str, Any]:
    """The driver's connection options: a connect timeout on PostgreSQL unless the URL sets one."""
    if url.get_backend_name() != "postgresql" or "connect_timeout" in url.query:
        return {}
    return {"connect_timeout": DATABASE_CONNECT_TIMEOUT_SECONDS}


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below open transactions, not pysqlite.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that
        # reads then writes can fail with SQLITE_BUSY when another process
        # committed in between, and the busy timeout cannot help it.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use only when it sat unused for a while.

    A connection used a moment ago is alive; pinging it (``pool_pre_ping``)
    would add a round trip to every transaction of a busy worker. One that sat
    idle may have been cut by a database restart or a proxy: it is pinged, and
    a dead one is replaced by a fresh connection before anyone uses it.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is not None and time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool discards this connection and checks out a fresh one.
            raise DisconnectionError(f"pooled connection is dead: {exc}") from exc


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (DATABASE_URL by default), created once per process."""
    global _default
    if url is None:
        # Every transaction asks for the default engine: answer from the last
        # lookup while the settings object is the same one.
        settings = get_settings()
        known = _default
        if known is not None and known[0] is settings:
            return known[1]
        default_engine = get_engine(settings.effective_database_url)
        _default = (settings, default_engine)
        return default_engine
    url = normalize_database_url(url)
    with _lock:
        found = _engines.get(url)
        if found is not None:
            engine = found
        else:
            if url.startswith("sqlite"):
                engine = _sqlite_engine(url)
            else:
                engine = create_engine(
                    url, pool_size=10, max_overflow=10, connect_args=_connect_args(make_url(url))
                )
                _ping_when_idle(engine)
            _engines[url] = engine
    if url not in _ready:
        # One thread creates the schema; the others (every worker thread asks at
        # start) wait for it instead of each inspecting the whole schema again.
        with _schema_lock:
            if url not in _ready:
                create_tables(engine)
                _ready.add(url)
    return engine


#: Every (table, column) and (index, "") the catalogue lists in the current schema,
#: by dialect: one round trip where SQLAlchemy's checks take one or more per table.
_CATALOGUE_QUERIES = {
    "postgresql": (
        "SELECT c.relname, CASE WHEN c.relkind = 'i' THEN '' ELSE a.attname END"
        " FROM pg_catalog.pg_class AS c"
        " JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace"
        " JOIN pg_catalog.pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
        " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'i')"
    ),
    "sqlite": (
        "SELECT m.name, p.name FROM sqlite_master AS m, pragma_table_info(m.name) AS p"
        " WHERE m.type = 'table'"
        " UNION ALL SELECT name, '' FROM sqlite_master WHERE type = 'index'"
    ),
}


def declared_schema() -> set[tuple[str, str]]:
    """What this version's tables need: each (table, column), and each (index, "")."""
    wanted: set[tuple[str, str]] = set()
    for table in SQLModel.metadata.sorted_tables:
        wanted.update((table.name, column.name) for column in table.columns)
        wanted.update((str(index.name), "") for index in table.indexes)
    return wanted


def schema_is_current(connection: Connection) -> bool:
    """Whether every table, column and index this version declares exists, in one query.

    False for a dialect without a catalogue query: the caller then checks the long way.
    """
    query = _CATALOGUE_QUERIES.get(connection.dialect.name)
    if query is None:
        return False
    found = {(str(name), str(column)) for name, column in connection.exec_driver_sql(query)}
    return declared_schema() <= found


def create_tables(engine: Engine) -> None:
    """Create missing tables, columns and indexes; safe when several processes start at once.

    A schema already up to date (every start but the first after an upgrade) is
    found so by one catalogue query, without the schema lock: on PostgreSQL the
    long way is about 80 round trips under a lock that every process starting
    at the same time (a fleet of workers, a burst of commands) queues on.
    """
    with engine.connect() as connection:
        if schema_is_current(connection):
            return
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        SQLModel.metadata.create_all(connection)
        _add_missing_columns(connection)


def _add_missing_columns(connection: Connection) -> None:
    """Additive schema changes for databases created by an earlier version.

    New columns are always nullable or carry a server default, so adding them to
    a populated table is safe; nothing is ever dropped or altered here.
    """
    inspector = inspect(connection)
    preparer = connection.dialect.identifier_preparer
    for table in SQLModel.metadata.sorted_tables:
        existing = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in existing:
                continue
            ddl = (
                f"ALTER TABLE {preparer.quote(table.name)} ADD COLUMN {preparer.quote(column.name)} "
                f"{column.type.compile(dialect=connection.dialect)}"
            )
            default = column.server_default
            if default is not None:
                ddl += f" DEFAULT {getattr(default, 'arg', default)}"
                if not column.nullable:
                    ddl += " NOT NULL"
            connection.execute(text(ddl))
        for index in table.indexes:
            index.create(connection, checkfirst=True)


def dispose_engines() -> None:
    """Close every pooled connection (after a fork, or at the end of tests)."""
    global _default
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _ready.clear()
        _checked.clear()
        _default = None


def transactions_lock_rows(url: str | None = None) -> bool:
    """Whether a transaction locks only the rows it touches (PostgreSQL), not the whole database.

    SQLite's transactions take its one write lock at their start (``BEGIN IMMEDIATE``,
    see ``_sqlite_engine``): tens of milliseconds of work inside one make every
    other writer wait.
    """
    return get_engine(url).dialect.name != "sqlite"


@contextmanager
def autocommit(url: str | None = None) -> Iterator[Connection]:
    """A connection on which each statement commits on its own.

    For a single write that stands alone: no ``BEGIN`` and ``COMMIT`` round trips
    around it. SQLite's transactions start with ``BEGIN IMMEDIATE`` (see
    ``_sqlite_engine``), which autocommit would skip: there the block is one
    transaction, committed when it succeeds.
    """
    engine = get_engine(url)
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            with connection.begin():
                yield connection
        else:
            yield connection.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def autocommit_session(url: str | None = None) -> Iterator[Session]:
    """A session on an ``autocommit`` connection: each statement final on its own (see there)."""
    with autocommit(url) as connection, Session(bind=connection, expire_on_commit=False) as session:
        yield session


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back otherwise."""
    with Session(get_engine(url), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
