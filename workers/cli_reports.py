"""``contract-dispatch lead-sources``: contracts by lead source over a period (read-only).

The summary is a table for people or one JSON object (``--json``); the listing
(``--contracts sent|signed``) is tab-separated lines under a header, or one JSON
object per line, streamed as the database returns them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import UTC, date, datetime
from typing import Any

from models.contract import ContractStatus
from models.reporting import LeadSourceCounts, LeadSourceReport, ReportedContract
from workers.cli import EXIT_OK
from workers.cli_progress import Progress

#: The status columns of the summary (the JSON object's order too).
STATUS_COLUMNS = tuple(ContractStatus)

#: A listing's progress line is updated once per this many contracts.
PROGRESS_EVERY_ROWS = 1000

#: The listing's columns (its header line, and the keys of each ``--json`` line).
LISTING_COLUMNS = (
    "contract_id",
    "workspace_id",
    "resource_group_id",
    "lead_source",
    "status",
    "sent_at",
    "signed_at",
    "company_name",
)


def moment(value: str) -> datetime:
    """An ISO 8601 date (midnight UTC) or date and time with its time zone."""
    try:
        if len(value) == len("2026-12-01"):
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 date (2026-11-01) or date and time (2026-11-01T00:00:00+01:00)"
        ) from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} has no time zone (add Z or +01:00)")
    try:
        # Stored in UTC: a moment that has none (0001-01-01T00:00+01:00) is refused here.
        return parsed.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{value!r} is out of range") from None


def _period_text(report: LeadSourceReport) -> str:
    since = report.since.isoformat() if report.since else "the first contract"
    until = f"{report.until.isoformat()} (excluded)" if report.until else "now"
    where = f"workspace {report.workspace_id}" if report.workspace_id else "all workspaces"
    return f"from {since} to {until}, {where}"


def _row(counts: LeadSourceCounts, name: str) -> list[str]:
    statuses = [str(counts.statuses.get(status, 0)) for status in STATUS_COLUMNS]
    return [name, str(counts.contracts), *statuses, str(counts.signed_in_period)]


def summary_table(report: LeadSourceReport) -> str:
    """The summary for people: a row per lead source and a total, under what they count."""
    header = ["lead source", "contracts", *STATUS_COLUMNS, "signed in period"]
    rows = [_row(counts, counts.lead_source or "(none)") for counts in report.lead_sources]
    rows.append(_row(report.total, "total"))
    widths = [max(len(line[index]) for line in [header, *rows]) for index in range(len(header))]
    lines = [
        f"Contracts by lead source {_period_text(report)}.",
        "contracts: sent in the period; queued ... cancelled: their status now; "
        "signed in period: signed in the period, whenever sent.",
        "",
    ]
    for line in [header, *rows]:
        cells = [
            line[0].ljust(widths[0]),
            *(cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)),
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _iso(value: Any) -> str:
    # As contract-status writes its times: ISO 8601 with the offset, +00:00.
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def listing_json(contract: ReportedContract) -> dict[str, Any]:
    """One line of ``--contracts --json``."""
    return {column: getattr(contract, column) for column in LISTING_COLUMNS}


def _cell(value: Any) -> str:
    # Names are refused with control characters, but a refused contract keeps what it was sent.
    if value is None:
        return ""
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "".join(" " if ch in "\t\r\n" else ch for ch in text)


def cmd_lead_sources(args: argparse.Namespace) -> int:
    from contract_dispatch.reports import lead_source_report, reported_contracts

    if args.since and args.until and args.since >= args.until:
        args.command_parser.error("--since must be before --until")
    filters = {
        "since": args.since,
        "until": args.until,
        "workspace_id": args.workspace,
        "lead_source": args.lead_source,
    }
    if args.contracts is None:
        report = lead_source_report(**filters)
        if args.json:
            sys.stdout.write(
                json.dumps(report.model_dump(), ensure_ascii=False, indent=2, default=_iso) + "\n"
            )
        else:
            sys.stdout.write(summary_table(report))
        return EXIT_OK
    contracts = reported_contracts(measure=args.contracts, **filters)
    # Its checks (the database, the workspace) run at the first row: before any output.
    first = next(contracts, None)
    if not args.json:
        sys.stdout.write("\t".join(LISTING_COLUMNS) + "\n")
    # On a terminal the lines themselves show how far it is; redirected, stderr says.
    progress = None if sys.stdout.isatty() else Progress(sys.stderr)
    listed = 0
    for contract in itertools.chain([first] if first else [], contracts):
        data = listing_json(contract)
        if args.json:
            sys.stdout.write(json.dumps(data, ensure_ascii=False, default=_iso) + "\n")
        else:
            sys.stdout.write("\t".join(_cell(data[column]) for column in LISTING_COLUMNS) + "\n")
        listed += 1
        if progress is not None and listed % PROGRESS_EVERY_ROWS == 0:
            progress.update(f"{listed:,} contracts listed")
    if progress is not None:
        progress.finish()
    sys.stderr.write(f"{listed:,} contract{'' if listed == 1 else 's'} {args.contracts} in the period\n")
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Register ``lead-sources``."""
    report = commands.add_parser(
        "lead-sources",
        help="contracts by lead source over a period, or their list (read-only)",
        description=(
            "Contracts sent in a period by lead source and status now, and those signed in it. "
            "A period is half-open: --since included, --until excluded."
        ),
    )
    report.add_argument(
        "--since", type=moment, metavar="WHEN", help="from this date (midnight UTC) or time, included"
    )
    report.add_argument(
        "--until", type=moment, metavar="WHEN", help="to this date (midnight UTC) or time, excluded"
    )
    report.add_argument("--workspace", metavar="ID", help="only this workspace's contracts")
    report.add_argument("--lead-source", choices=["bap", "network", "other"], help="only this lead source")
    report.add_argument(
        "--contracts",
        choices=["sent", "signed"],
        help="list the contracts sent (or signed) in the period instead, oldest first",
    )
    report.add_argument(
        "--json", action="store_true", help="one JSON object (with --contracts: one per line)"
    )
    report.set_defaults(handler=cmd_lead_sources)
