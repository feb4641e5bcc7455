"""``contract-dispatch dead-letters``: see, retry and purge messages that failed for good."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import redis
from sqlalchemy.exc import OperationalError

from models.dead_letter import DeadLetter, DeadLetterStatus, find_dead_letters
from models.types import utc_now
from workers.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_REFUSED, print_json, whole_number
from workers.cli_progress import Progress
from workers.database import require_database, session_scope
from workers.settings import get_settings

#: What a dead-letter action returns (the retried records, or how many were purged).
T = TypeVar("T")

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w`` or combinations such as ``1d12h``."""
    text = value.strip().lower()
    if not text or _DURATION_PART.sub("", text):
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration (e.g. 30m, 12h, 7d, 1d12h)")
    return timedelta(seconds=sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text)))


#: The largest dead-letter id (the column is a 32-bit integer on PostgreSQL).
MAX_RECORD_ID = 2**31 - 1


def _broker() -> Any:
    import actors

    return actors.broker


def _sync_quietly(*, warn: bool = True, start_embedded: bool = True) -> None:
    """File dead letters that only Redis knows about; say so if Redis is unreachable
    (unless not ``warn``: retry and purge say it, as their one line, when they need it).

    Raises ``DatabaseMissing`` first: filing them into a mistyped SQLite path
    would create a database of their own there. Without ``start_embedded`` (the
    commands that only read, as ``status``) an embedded Redis that is not running
    is not started: the SQL records are shown.
    """
    from workers import dead_letters, embedded_redis

    require_database()
    settings = get_settings()
    if not start_embedded and not settings.redis_url and not embedded_redis.is_running(settings.data_dir):
        sys.stderr.write(
            "warning: the embedded Redis is not running (a worker starts it), showing SQL records only\n"
        )
        return
    try:
        broker = _broker()
        dead_letters.sync(broker, broker.get_declared_queues())
    except OperationalError:
        raise  # the database: the command cannot show anything
    except Exception as exc:
        if not warn:
            return
        # On RabbitMQ, Redis only coordinates: name the one that failed.
        what = "Redis" if isinstance(exc, redis.RedisError) else "the broker"
        sys.stderr.write(
            f"warning: {what} could not be read, showing SQL records only ({type(exc).__name__})\n"
        )


def as_json(record: DeadLetter, *, full: bool = False) -> dict[str, Any]:
    """One dead letter as printed by ``--json``."""
    data: dict[str, Any] = {
        "id": record.id,
        "message_id": record.message_id,
        "queue": record.queue_name,
        "actor": record.actor_name,
        "contract_id": record.contract_id,
        "exception_type": record.exception_type,
        "exception_message": record.exception_message,
        "attempts": record.attempts,
        "first_failed_at": record.first_failed_at.isoformat(),
        "last_failed_at": record.last_failed_at.isoformat(),
        "status": record.status,
        "retry_count": record.retry_count,
        "retried_at": record.retried_at.isoformat() if record.retried_at else None,
    }
    if full:
        data["args"] = record.message_args
        data["kwargs"] = record.message_kwargs
        data["traceback"] = record.traceback
        data["redis_message_id"] = record.redis_message_id
    return data


def _with_progress(action: Callable[..., T], records: list[DeadLetter]) -> T:
    """``dead_letters.retry`` or ``purge`` of ``records``, with a progress line on stderr."""
    ids = [r.id for r in records if r.id is not None]
    progress = Progress(sys.stderr)
    try:
        return action(
            _broker(), ids, on_each=lambda done: progress.update(f"{done} of {len(ids)} dead letters handled")
        )
    finally:
        progress.finish()


def _unknown(args: argparse.Namespace) -> int:
    """No dead letter has ``args.id``: say so (on stdout too with ``--json``), exit 1."""
    message = f"no dead letter has id {args.id}"
    if getattr(args, "json", False):
        print_json({"id": args.id, "error": {"code": "unknown_dead_letter", "message": message}})
    sys.stderr.write(f"unknown_dead_letter: {message}\n")
    return EXIT_NOT_FOUND


def cmd_list(args: argparse.Namespace) -> int:
    _sync_quietly(start_embedded=False)
    with session_scope() as session:
        records = find_dead_letters(
            session, queue_name=args.queue, actor_name=args.actor, include_retried=args.include_retried
        )
    if args.json:
        print_json([as_json(record) for record in records])
        return EXIT_OK
    if not records:
        sys.stdout.write("no dead letters\n")
        return EXIT_OK
    header = f"{'ID':>5}  {'ACTOR':<19} {'CONTRACT':<20} {'ATTEMPTS':>8}  {'LAST FAILED (UTC)':<19}  REASON"
    lines = [header]
    for record in records:
        reason = f"{record.exception_type}: {record.exception_message}".replace("\n", " ")
        if record.status != "dead":
            reason = f"[{record.status}] {reason}"
        lines.append(
            f"{record.id:>5}  {record.actor_name[:19]:<19} {(record.contract_id or '-')[:20]:<20} "
            f"{record.attempts:>8}  {record.last_failed_at:%Y-%m-%d %H:%M:%S}  {reason[:90]}"
        )
    lines.append(f"{len(records)} dead letter{'s' if len(records) != 1 else ''}")
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    _sync_quietly(start_embedded=False)
    with session_scope() as session:
        record = session.get(DeadLetter, args.id)
    if record is None:
        return _unknown(args)
    data = as_json(record, full=True)
    if args.json:
        print_json(data)
        return EXIT_OK
    for key, value in data.items():
        if key in ("args", "kwargs"):
            value = json.dumps(value, ensure_ascii=False)
        if key == "traceback":
            continue
        sys.stdout.write(f"{key:>18}: {'-' if value is None else value}\n")
    if record.traceback:
        sys.stdout.write("\n" + record.traceback.rstrip() + "\n")
    return EXIT_OK


def _selected(args: argparse.Namespace) -> list[DeadLetter] | None:
    with session_scope() as session:
        if args.id is not None:
            record = session.get(DeadLetter, args.id)
            return [record] if record is not None else None
        failed_before = utc_now() - args.older_than if getattr(args, "older_than", None) else None
        include_retried = failed_before is not None
        return find_dead_letters(
            session,
            queue_name=args.queue,
            actor_name=args.actor,
            include_retried=include_retried,
            failed_before=failed_before,
        )


#: The refusal of ``retry ID`` for a record that holds nothing to send again.
NOT_RETRYABLE = "dead_letter_not_retryable"


def _not_retryable(record: DeadLetter) -> str | None:
    """Why ``retry`` would do nothing with this record, or None."""
    from workers.dead_letters import MALFORMED_ACTOR

    if record.status != DeadLetterStatus.DEAD:
        return (
            f"dead letter {record.id} was already retried: its message went back to its queue "
            "(dead-letters show tells whether it died again)"
        )
    if record.actor_name == MALFORMED_ACTOR:
        return (
            f"dead letter {record.id} is not a Dramatiq message: there is nothing to send again "
            "(read it with dead-letters show, fix its producer, then purge it)"
        )
    return None


def cmd_retry(args: argparse.Namespace) -> int:
    from workers import dead_letters

    if (args.id is None) == (not args.all):
        args.command_parser.error("give one dead letter ID or --all")
    _sync_quietly(warn=False)
    records = _selected(args)
    if records is None:
        return _unknown(args)
    if args.id is not None and (problem := _not_retryable(records[0])) is not None:
        if args.json:
            print_json({"id": args.id, "error": {"code": NOT_RETRYABLE, "message": problem}})
        sys.stderr.write(f"{NOT_RETRYABLE}: {problem}\n")
        return EXIT_REFUSED
    retried = _with_progress(dead_letters.retry, records)
    result = {"retried": [r.id for r in retried], "count": len(retried)}
    if args.json:
        print_json(result)
    else:
        sys.stdout.write(f"retried {len(retried)} dead letter(s)\n")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    from workers import dead_letters

    if (args.id is None) == (args.older_than is None):
        args.command_parser.error("give one dead letter ID or --older-than DURATION")
    _sync_quietly(warn=False)
    records = _selected(args)
    if records is None:
        return _unknown(args)
    if not records:
        if args.json:
            print_json({"purged": 0})
        else:
            sys.stdout.write("nothing to purge\n")
        return EXIT_OK
    if not args.yes:
        # Their copies are in Redis, or in RabbitMQ's dead-letter queues.
        broker = "RabbitMQ" if get_settings().uses_rabbitmq else "Redis"
        sys.stderr.write(f"Purge {len(records)} dead letter(s) from SQL and {broker} for good? [y/N] ")
        sys.stderr.flush()
        try:
            answer = sys.stdin.readline().strip().lower()
        except KeyboardInterrupt:
            sys.stderr.write("\n")  # the prompt's line is not the interruption's
            raise
        if answer not in ("y", "yes"):
            sys.stderr.write("not purged\n")
            return EXIT_REFUSED
    count = _with_progress(dead_letters.purge, records)
    if args.json:
        print_json({"purged": count})
    else:
        sys.stdout.write(f"purged {count} dead letter(s)\n")
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Register ``dead-letters list|show|retry|purge``."""
    parser = commands.add_parser("dead-letters", help="messages that failed for good, with their reason")
    actions = parser.add_subparsers(dest="dead_letters_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="dead letters, newest first")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    listing.add_argument("--queue", metavar="Q", help="only this queue's (e.g. emails)")
    listing.add_argument("--actor", metavar="A", help="only this actor's (e.g. send_contract)")
    listing.add_argument("--include-retried", action="store_true", help="also those already retried")
    listing.set_defaults(handler=cmd_list)

    show = actions.add_parser("show", help="one dead letter with its payload and traceback")
    show.add_argument("id", type=whole_number(high=MAX_RECORD_ID), metavar="ID", help="its id, from list")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(handler=cmd_show)

    retry = actions.add_parser("retry", help="re-enqueue with a fresh retry count")
    retry.add_argument(
        "id",
        type=whole_number(high=MAX_RECORD_ID),
        nargs="?",
        metavar="ID",
        help="the one to retry (or --all)",
    )
    retry.add_argument("--all", action="store_true", help="every dead letter (filtered by --actor/--queue)")
    retry.add_argument("--actor", metavar="A", help="with --all: only this actor's")
    retry.add_argument("--queue", metavar="Q", help="with --all: only this queue's")
    retry.add_argument("--json", action="store_true", help='{"retried": [IDs], "count": N} on stdout')
    retry.set_defaults(handler=cmd_retry)

    purge = actions.add_parser("purge", help="delete from SQL and Redis (asks unless --yes)")
    purge.add_argument(
        "id",
        type=whole_number(high=MAX_RECORD_ID),
        nargs="?",
        metavar="ID",
        help="the one to delete (or --older-than)",
    )
    purge.add_argument("--older-than", type=parse_duration, metavar="DURATION", help="e.g. 30d, 12h, 1d12h")
    purge.add_argument("--actor", metavar="A", help="with --older-than: only this actor's")
    purge.add_argument("--queue", metavar="Q", help="with --older-than: only this queue's")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.add_argument("--json", action="store_true", help='{"purged": N} on stdout')
    purge.set_defaults(handler=cmd_purge)
