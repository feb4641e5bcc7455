"""``contract-dispatch contract-status``: a contract's status and its emails', or many contracts'.

One id prints one object (``--json``) or a few lines for people. Several ids, or
``-`` for one id per line on stdin, print one object per line in the order asked,
read from the database in groups (two queries per group).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

from models.status import ContractReport
from workers.cli import EXIT_NOT_FOUND, EXIT_OK, print_json

#: The keys of the ``contract-status --json`` object, in order (an unknown id has them too).
STATUS_JSON_KEYS = (
    "contract_id",
    "status",
    "error",
    "lead_source",
    "signed_at",
    "cancelled_at",
    "reminder_count",
    "next_reminder_at",
    "emails",
)


def status_json(report: ContractReport) -> dict[str, Any]:
    """The ``contract-status --json`` object."""
    return {
        "contract_id": report.contract_id,
        "status": report.status,
        "error": report.error.model_dump() if report.error else None,
        "lead_source": report.lead_source,
        "signed_at": report.signed_at.isoformat() if report.signed_at else None,
        "cancelled_at": report.cancelled_at.isoformat() if report.cancelled_at else None,
        "reminder_count": report.reminder_count,
        "next_reminder_at": report.next_reminder_at.isoformat() if report.next_reminder_at else None,
        "emails": [
            {
                "kind": email.kind,
                "to": email.to,
                "step": email.step,
                "status": email.status,
                "attempts": email.attempts,
                "provider_message_id": email.provider_message_id,
                "last_error": email.last_error,
                "sent_at": email.sent_at.isoformat() if email.sent_at else None,
            }
            for email in report.emails
        ],
    }


#: ``contract-status -`` asks the database for at most this many ids at a time.
STATUS_IDS_PER_READ = 500

#: The longest line ``contract-status -`` takes as an id, in bytes (an id has at most 128 characters).
MAX_ID_LINE_BYTES = 1024


def _unknown_status_json(contract_id: str | None, message: str) -> dict[str, Any]:
    """The ``--json`` object of an id no contract has: the same keys, the error filled in."""
    return {
        **dict.fromkeys(STATUS_JSON_KEYS),
        "contract_id": contract_id,
        "error": {"code": "unknown_contract", "message": message},
        "emails": [],
    }


def status_text(report: ContractReport) -> str:
    """``contract-status``'s lines for people."""
    lines = [f"contract {report.contract_id}: {report.status}"]
    if report.error:
        lines.append(f"  error: {report.error.code}: {report.error.message}")
    if report.signed_at:
        lines.append(f"  signed at: {report.signed_at.isoformat()}")
    if report.cancelled_at:
        lines.append(f"  cancelled at: {report.cancelled_at.isoformat()}")
    if report.next_reminder_at:
        lines.append(
            f"  reminders sent: {report.reminder_count}, next due: {report.next_reminder_at.isoformat()}"
        )
    for email in report.emails:
        provider = f" id={email.provider_message_id}" if email.provider_message_id else ""
        lines.append(
            f"  {email.kind} #{email.step} to {email.to}: {email.status} "
            f"(attempts {email.attempts}){provider}"
        )
        if email.last_error and email.status != "sent":
            lines.append(f"    last error: {email.last_error}")
    return "\n".join(lines) + "\n"


def _stdin_ids() -> Iterator[list[str | None]]:
    """Stdin's non-blank lines as ids, in groups; None for a line too long to be one.

    A group waits for its first line, then takes those already arrived (up to
    ``STATUS_IDS_PER_READ``): from a file groups fill at once, and a producer
    writing one id at a time into a pipe gets each answer as soon as it writes.
    """
    from workers.cli_bulk import UTF8_BOM
    from workers.line_feed import LineFeed

    feed = LineFeed(sys.stdin.buffer, max_line_bytes=MAX_ID_LINE_BYTES)
    while True:
        group: list[str | None] = []
        while len(group) < STATUS_IDS_PER_READ:
            read = feed.next_line(timeout=0 if group else None)
            if read is None:
                break
            number, raw = read
            if raw is None:
                group.append(None)
            elif (
                contract_id := raw.removeprefix(UTF8_BOM if number == 1 else b"")
                .decode(errors="replace")
                .strip()
            ):
                group.append(contract_id)
        if not group:
            return
        yield group


def _asked_ids(args: argparse.Namespace) -> Iterator[list[str | None]]:
    """The ids asked, in order and in groups: the arguments, with ``-`` standing for stdin's lines."""
    for argument in args.contract_ids:
        if argument == "-":
            yield from _stdin_ids()
        else:
            yield [argument]


def cmd_contract_status(args: argparse.Namespace) -> int:
    from contract_dispatch import contract_statuses

    # One id as an argument: one indented object, as always; several, or stdin: one per line.
    one = args.contract_ids != ["-"] and len(args.contract_ids) == 1
    code = EXIT_OK
    for group in _asked_ids(args):
        reports = contract_statuses(contract_id for contract_id in group if contract_id is not None)
        for contract_id in group:
            report = reports.get(contract_id) if contract_id is not None else None
            if report is None:
                message = (
                    f"no contract has id {contract_id!r}"
                    if contract_id is not None
                    else f"a line longer than {MAX_ID_LINE_BYTES} bytes is not a contract id"
                )
                sys.stderr.write(f"unknown_contract: {message}\n")
                code = EXIT_NOT_FOUND
            if args.json:
                data = status_json(report) if report else _unknown_status_json(contract_id, message)
                if one:
                    print_json(data)
                else:
                    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
            elif report is not None:
                sys.stdout.write(status_text(report))
        # A producer writing ids into a pipe reads each group's answers before writing more.
        sys.stdout.flush()
    return code


def add_commands(commands: Any) -> None:
    """Register ``contract-status``."""
    status = commands.add_parser("contract-status", help="a contract's status and its emails")
    status.add_argument(
        "contract_ids",
        nargs="+",
        metavar="ID",
        help="a contract's id; several, or - to read one per line from stdin",
    )
    status.add_argument(
        "--json", action="store_true", help="one JSON object (with several ids, or -: one per line)"
    )
    status.set_defaults(handler=cmd_contract_status)
