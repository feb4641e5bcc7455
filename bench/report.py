"""The lead-source report over a year of contracts, against bare reads of the same rows.

A fresh database per kind holds ``--report-contracts`` contracts (default
1,000,000) sent at even intervals through 2026, a fifth of them signed a day
later, lead sources and statuses in turn. Each figure has its baseline measured
on the same rows in the same run:

- the summary (``lead_source_report``) of one month and of the whole table,
  against ``SELECT count(*)`` over the same contracts (the least a report reads);
- the listing (``reported_contracts``) of that month's contracts, in rows per
  second, against fetching the same columns with a bare cursor;
- the listing's peak Python memory (``tracemalloc``) for the month and for the
  quarter around it: the same for three times the rows, since rows are streamed.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from bench import Database, DatabaseKind, Workbench, against, machine, seconds
from bench.sweep import at, settle, timestamp

DESCRIPTION = "lead-source report and listing over a year of contracts, against bare reads"

#: Contracts in the table unless ``--report-contracts`` says otherwise (``--quick``: a tenth).
DEFAULT_CONTRACTS = 1_000_000

#: The contracts are sent through this year, at even intervals.
YEAR_START = datetime(2026, 1, 1, tzinfo=UTC)
YEAR_SECONDS = 365 * 86400

#: The month reported on, and the quarter of the memory figure (half-open periods).
MONTH = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
QUARTER = (datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC))

#: Each summary is timed this many times; the best run is kept.
REPEAT = 3


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--report-contracts",
        type=int,
        default=None,
        metavar="N",
        help=f"contracts in the table (default {DEFAULT_CONTRACTS:,}; --quick: a tenth)",
    )


def populate(database: Database, *, size: int) -> None:
    """``size`` contracts in one INSERT ... SELECT: statuses, lead sources and signatures in turn."""
    from workers.database import get_engine

    kind = database.kind
    if kind == "postgresql":
        numbers = "seq AS (SELECT i FROM generate_series(1, CAST(:n AS integer)) AS i)"
        empty_json = "CAST('[]' AS json)"
    else:
        numbers = "seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :n)"
        empty_json = "'[]'"
    sent = at(kind, "t0", "i * :step")
    statement = f"""
        WITH RECURSIVE {numbers}
        INSERT INTO contracts (
            id, status, content_hash, workspace_id, email, company_name, lead_source, locale,
            sections, signatories, access_code_issued, created_at, updated_at, signed_at, reminder_count
        )
        SELECT 'report-' || i,
            CASE i % 5 WHEN 0 THEN 'queued' WHEN 1 THEN 'sent' WHEN 2 THEN 'rejected'
                       WHEN 3 THEN 'signed' ELSE 'cancelled' END,
            '', 'ws-main', 'client-' || i || '@bench.example', 'Company ' || i,
            CASE i % 3 WHEN 0 THEN 'bap' WHEN 1 THEN 'network' ELSE 'other' END, 'fr',
            {empty_json}, {empty_json}, i % 2 = 0, {sent}, {sent},
            CASE WHEN i % 5 = 3 THEN {at(kind, "t0", "i * :step + 86400")} END, 0
        FROM seq"""
    parameters = {"n": size, "step": YEAR_SECONDS // size, "t0": timestamp(kind, YEAR_START)}
    with get_engine().begin() as connection:
        connection.execute(text(statement), parameters)
    settle(database)


def best_of(action: Any) -> tuple[float, Any]:
    """The shortest of ``REPEAT`` runs of ``action``, in seconds, and its last result."""
    best, result = float("inf"), None
    for _ in range(REPEAT):
        started = time.perf_counter()
        result = action()
        best = min(best, time.perf_counter() - started)
    return best, result


def bare_count(period: tuple[datetime, datetime] | None) -> int:
    """``SELECT count(*)`` of the contracts sent in ``period`` (all without one)."""
    from sqlmodel import col, func, select

    from models.contract import Contract
    from workers.database import session_scope

    # Filtered even for the whole table: a bare count(*) is answered from the smallest index.
    query = select(func.count()).select_from(Contract).where(col(Contract.created_at).is_not(None))
    if period is not None:
        query = query.where(col(Contract.created_at) >= period[0], col(Contract.created_at) < period[1])
    with session_scope() as session:
        return int(session.exec(query).one())


def bare_fetch(period: tuple[datetime, datetime]) -> int:
    """The listing's columns of the period's contracts, in its order, through a bare cursor."""
    from workers.database import autocommit

    with autocommit() as connection:
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        placeholder = "%s" if connection.dialect.name == "postgresql" else "?"
        since, until = (
            (moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds"))
            if connection.dialect.name == "sqlite"
            else moment
            for moment in period
        )
        cursor.execute(
            "SELECT id, workspace_id, resource_group_id, lead_source, status, company_name, created_at,"
            f" signed_at FROM contracts WHERE created_at >= {placeholder} AND created_at < {placeholder}"
            " ORDER BY created_at, id",
            (since, until),
        )
        rows = 0
        while batch := cursor.fetchmany(1000):
            rows += len(batch)
        cursor.close()
        return rows


def listing(period: tuple[datetime, datetime]) -> int:
    from contract_dispatch import reported_contracts

    return sum(1 for _ in reported_contracts(measure="sent", since=period[0], until=period[1]))


def peak_memory(period: tuple[datetime, datetime]) -> tuple[int, int]:
    """Rows listed in ``period`` and the peak of Python's allocations meanwhile, in bytes."""
    tracemalloc.start()
    try:
        rows = listing(period)
        return rows, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run_on(workbench: Workbench, kind: DatabaseKind, size: int) -> dict[str, Any]:
    from contract_dispatch import lead_source_report

    with workbench.database(kind, "report") as database:
        from contract_dispatch import set_workspace

        set_workspace("ws-main", ["rg-1"])
        print(f"  {kind}: {size:,} contracts ...", flush=True)
        started = time.perf_counter()
        populate(database, size=size)
        populate_s = time.perf_counter() - started
        # Untimed: the first call pays for imports, statement compilation and the pool.
        lead_source_report(since=MONTH[0], until=MONTH[1])
        month_s, month = best_of(lambda: lead_source_report(since=MONTH[0], until=MONTH[1]))
        month_count_s, month_count = best_of(lambda: bare_count(MONTH))
        year_s, year = best_of(lead_source_report)
        year_count_s, _ = best_of(lambda: bare_count(None))
        if month.total.contracts != month_count:
            raise SystemExit(
                f"the month's report counts {month.total.contracts}, SELECT count(*) {month_count}"
            )
        listing_s, listed = best_of(lambda: listing(MONTH))
        fetch_s, fetched = best_of(lambda: bare_fetch(MONTH))
        if listed != fetched:
            raise SystemExit(f"the listing gave {listed} rows, the bare fetch {fetched}")
        month_rows, month_peak = peak_memory(MONTH)
        quarter_rows, quarter_peak = peak_memory(QUARTER)
        return {
            "database": kind,
            "contracts": size,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "populate_s": populate_s,
            "month_contracts": month.total.contracts,
            "month_signed": month.total.signed_in_period,
            "summary_month_s": month_s,
            "count_month_s": month_count_s,
            "summary_all_s": year_s,
            "count_all_s": year_count_s,
            "all_contracts": year.total.contracts,
            "listing_rows": listed,
            "listing_rows_per_s": listed / listing_s,
            "bare_fetch_rows_per_s": fetched / fetch_s,
            "listing_peak_bytes": {"month": month_peak, "quarter": quarter_peak},
            "listing_peak_rows": {"month": month_rows, "quarter": quarter_rows},
        }


def run(workbench: Workbench, options: argparse.Namespace, kinds: list[DatabaseKind]) -> dict[str, Any]:
    size = options.report_contracts or (DEFAULT_CONTRACTS // 10 if options.quick else DEFAULT_CONTRACTS)
    return {kind: run_on(workbench, kind, size) for kind in kinds}


def summary(figures: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for kind, result in figures.items():
        peaks, rows = result["listing_peak_bytes"], result["listing_peak_rows"]
        lines += [
            f"lead-source report on {kind}: {result['contracts']:,} contracts over a year "
            f"(populated in {seconds(result['populate_s'])})",
            f"  summary of a month ({result['month_contracts']:,} sent, {result['month_signed']:,} signed)"
            f"   {against(result['summary_month_s'], result['count_month_s'])} (base: SELECT count(*) "
            f"{seconds(result['count_month_s'])})",
            f"  summary of the whole table   {against(result['summary_all_s'], result['count_all_s'])} "
            f"(base: SELECT count(*) {seconds(result['count_all_s'])})",
            f"  listing of the month         {result['listing_rows_per_s']:,.0f} rows/s, "
            f"{result['listing_rows_per_s'] / result['bare_fetch_rows_per_s']:.2f} x a bare cursor's "
            f"{result['bare_fetch_rows_per_s']:,.0f} rows/s",
            f"  listing's peak memory        {peaks['month'] / 2**20:.1f} MiB for {rows['month']:,} rows, "
            f"{peaks['quarter'] / 2**20:.1f} MiB for {rows['quarter']:,}",
        ]
    return lines
