"""Insert-or-ignore that both SQLite and PostgreSQL run as one statement."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Row, Table, Text, column, func, literal, select
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Session, SQLModel

T = TypeVar("T")

#: Values per ``IN (...)`` list: well under the 999 bound parameters old SQLite builds allow.
IN_LIST_CHUNK = 500


def table_of(model: type[SQLModel]) -> Table:
    """The SQLAlchemy table behind a SQLModel table class."""
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


def affected_rows(result: Any) -> int:
    """Rows matched by an INSERT, UPDATE or DELETE result."""
    return int(cast(CursorResult[Any], result).rowcount)


def insert_ignoring_conflict(
    session: Session,
    table: type[SQLModel],
    values: dict[str, Any],
    *,
    conflict_columns: list[str],
) -> bool:
    """``INSERT ... ON CONFLICT DO NOTHING``; True if a row was inserted.

    On PostgreSQL a concurrent uncommitted insert of the same key makes this wait
    for that transaction, so the caller's next read sees the winner's row.
    """
    # The row inserted, read back: psycopg reports no rowcount (-1) for this
    # statement when nothing else is returned, so rowcount cannot tell.
    inserted = insert_returning(
        session, table, values, conflict_columns=conflict_columns, returning=conflict_columns[0]
    )
    return inserted is not None


def insert_returning(
    session: Session,
    table: type[SQLModel],
    values: dict[str, Any],
    *,
    conflict_columns: list[str],
    returning: str,
) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING returning``: the new row's value, or None."""
    row = insert_returning_row(
        session, table, values, conflict_columns=conflict_columns, returning=(returning,)
    )
    return None if row is None else row[0]


def insert_returning_row(
    session: Session,
    table: type[SQLModel],
    values: dict[str, Any],
    *,
    conflict_columns: list[str],
    returning: Sequence[str],
) -> Row[Any] | None:
    """``insert_returning`` of several columns: the new row's ``returning`` columns, or None."""
    statement = _insert_statement(
        session.get_bind().dialect.name, table_of(table), tuple(conflict_columns), tuple(returning)
    )
    return session.execute(statement, values).first()


@functools.lru_cache(maxsize=64)
def _insert_statement(
    dialect: str, target: Table, conflict_columns: tuple[str, ...], returning: tuple[str, ...]
) -> Any:
    # Built once per table and shape, the values bound at execution: a reused
    # statement keeps its cache key (the hot path inserts for every contract).
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert(target)
        .on_conflict_do_nothing(index_elements=list(conflict_columns))
        .returning(*(target.c[name] for name in returning))
    )


def insert_many_ignoring_conflict(
    session: Session,
    table: type[SQLModel],
    rows: Sequence[dict[str, Any]],
    *,
    conflict_columns: list[str],
) -> None:
    """``INSERT ... ON CONFLICT DO NOTHING`` for many rows, as one executemany."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(
        insert(table_of(table)).on_conflict_do_nothing(index_elements=conflict_columns), list(rows)
    )


def insert_many_returning(
    session: Session,
    table: type[SQLModel],
    rows: Sequence[dict[str, Any]],
    *,
    conflict_columns: list[str],
    returning: str,
) -> set[Any]:
    """``insert_many_ignoring_conflict`` that returns the ``returning`` value of each row inserted.

    SQLAlchemy sends the rows as multi-row INSERTs with RETURNING ("insertmanyvalues"),
    so a batch takes a few round trips, not one per row.
    """
    if not rows:
        return set()
    target = table_of(table)
    if session.get_bind().dialect.name == "postgresql":
        return _insert_recordset_returning(
            session, target, rows, conflict_columns=conflict_columns, returning=returning
        )
    statement = (
        sqlite.insert(target)
        .on_conflict_do_nothing(index_elements=conflict_columns)
        .returning(target.c[returning])
    )
    return set(session.execute(statement, list(rows)).scalars())


def _insert_recordset_returning(
    session: Session,
    target: Table,
    rows: Sequence[dict[str, Any]],
    *,
    conflict_columns: list[str],
    returning: str,
) -> set[Any]:
    """PostgreSQL: the rows as one JSON parameter, unpacked by ``jsonb_to_recordset``.

    A multi-row VALUES list binds one parameter per cell, and psycopg parses
    such a statement afresh each time (it is too long for its cache): for a batch
    of 500 contracts that parsing cost more than the insert. One parameter keeps
    the statement short, and PostgreSQL decodes the JSON in C.
    """
    names = list(rows[0])
    records = (
        func.jsonb_to_recordset(sql_cast(literal(json.dumps(list(rows), default=_json_value), Text), JSONB))
        .table_valued(*(column(name, target.c[name].type) for name in names))
        .render_derived(name="incoming", with_types=True)
    )
    statement = (
        postgresql.insert(target)
        .from_select(names, select(*(records.c[name] for name in names)))
        .on_conflict_do_nothing(index_elements=conflict_columns)
        .returning(target.c[returning])
    )
    return set(session.execute(statement).scalars())


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        # A timezone-aware ISO 8601 timestamp, which timestamptz reads as it is.
        return value.isoformat()
    raise TypeError(f"cannot insert {type(value).__name__} through jsonb_to_recordset")


def chunks(items: Sequence[T], size: int = IN_LIST_CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in slices of at most ``size`` (for ``IN (...)`` lists)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
