"""The ``contract-dispatch`` command line.

Exit codes: 0 success, 1 not found or unhealthy, 2 a refusal (the error code and
a message on stderr) or a usage error, 3 the broker, the database or the configuration is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from models.errors import ConfigurationError, DispatchError, Rejected, TransientError
from workers.broker_errors import BROKER_ERRORS, broker_problem
from workers.logs import configure_logging
from workers.settings import configuration_problems, get_settings

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_REFUSED = 2
EXIT_UNAVAILABLE = 3
#: Stopped by Ctrl-C (SIGINT): 128 + the signal's number, as a shell reports it.
EXIT_INTERRUPTED = 130

#: Worker threads per process (Dramatiq's default); the work waits on I/O.
DEFAULT_WORKER_THREADS = 8


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (times and other objects as their text)."""
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2, default=str) + "\n")


def unavailable_reason(error: Exception) -> str:
    """What to say when the broker or the database cannot be used (no URL, so no password)."""
    if isinstance(error, OperationalError):
        from workers.database import unavailable

        return str(unavailable(error))
    return str(error)


def _refuse(error: Rejected) -> int:
    sys.stderr.write(f"{error.code}: {error.message}\n")
    return EXIT_REFUSED


def split_signatory(value: str) -> dict[str, str]:
    """``EMAIL[:Display name]``; the separator is the first ``:`` after the ``@``."""
    at = value.find("@")
    colon = value.find(":", at + 1) if at >= 0 else -1
    if colon < 0:
        return {"email": value}
    name = value[colon + 1 :]
    return {"email": value[:colon], "name": name} if name.strip() else {"email": value[:colon]}


def split_section(value: str) -> dict[str, str]:
    """``ID[:Title]``."""
    section_id, sep, title = value.partition(":")
    return {"id": section_id, "title": title} if sep and title.strip() else {"id": section_id}


# -- commands ----------------------------------------------------------------


def cmd_workspace_set(args: argparse.Namespace) -> int:
    from contract_dispatch import set_workspace

    try:
        set_workspace(args.workspace_id, args.resource_group)
    except ValueError as exc:
        sys.stderr.write(f"invalid_payload: {exc}\n")
        return EXIT_REFUSED
    print_json(_workspace_json(args.workspace_id, list(dict.fromkeys(args.resource_group))))
    return EXIT_OK


def _workspace_json(workspace_id: str, groups: list[str]) -> dict[str, Any]:
    return {"workspace_id": workspace_id, "resource_groups": groups}


def cmd_workspace_list(args: argparse.Namespace) -> int:
    from contract_dispatch import workspaces

    registered = workspaces()
    if args.json:
        print_json([_workspace_json(workspace_id, groups) for workspace_id, groups in registered.items()])
    else:
        for workspace_id, groups in registered.items():
            sys.stdout.write(f"{workspace_id}: {', '.join(groups)}\n")
        sys.stderr.write(f"{len(registered)} workspace{'' if len(registered) == 1 else 's'}\n")
    return EXIT_OK


def cmd_workspace_show(args: argparse.Namespace) -> int:
    from contract_dispatch import workspaces

    groups = workspaces().get(args.workspace_id)
    if groups is None:
        sys.stderr.write(f"unknown_workspace: workspace {args.workspace_id!r} is not registered\n")
        return EXIT_NOT_FOUND
    print_json(_workspace_json(args.workspace_id, groups))
    return EXIT_OK


def cmd_send_contract(args: argparse.Namespace) -> int:
    from contract_dispatch import send_contract

    receipt = send_contract(
        contract_id=args.contract_id,
        email=args.email,
        company_name=args.company,
        lead_source=args.lead_source,
        workspace_id=args.workspace,
        resource_group_id=args.resource_group,
        signatories=[split_signatory(value) for value in args.signatory],
        sections=[split_section(value) for value in args.section],
        title=args.title,
        locale=args.locale,
    )
    sys.stdout.write(json.dumps(receipt.model_dump(), ensure_ascii=False) + "\n")
    return EXIT_OK


def cmd_notify_signatories(args: argparse.Namespace) -> int:
    from contract_dispatch import notify_signatories

    receipt = notify_signatories(
        contract_id=args.contract_id,
        legal_name=args.legal_name,
        accepted_sections=args.accepted_section,
        registration_number=args.registration_number,
        signer_name=args.signer_name,
    )
    sys.stdout.write(json.dumps(receipt.model_dump(), ensure_ascii=False) + "\n")
    return EXIT_OK


def cmd_cancel_contract(args: argparse.Namespace) -> int:
    from contract_dispatch import cancel_contract

    receipt = cancel_contract(contract_id=args.contract_id, reason=args.reason)
    sys.stdout.write(json.dumps(receipt.model_dump(), ensure_ascii=False) + "\n")
    return EXIT_OK


def cmd_resend_invitation(args: argparse.Namespace) -> int:
    from contract_dispatch import resend_invitation

    receipt = resend_invitation(args.contract_id)
    sys.stdout.write(json.dumps(receipt.model_dump(), ensure_ascii=False) + "\n")
    return EXIT_OK


def _aware_datetime(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 date and time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} has no time zone (add Z or +01:00)")
    # Room for the days a sweep adds (delays, windows, code lifetimes) within the calendar.
    if not datetime.min.year + 1 < moment.year < datetime.max.year - 1:
        raise argparse.ArgumentTypeError(
            f"{value!r} is out of range (years {datetime.min.year + 2} to {datetime.max.year - 2})"
        )
    return moment


def cmd_reminders_run(args: argparse.Namespace) -> int:
    from contract_dispatch import run_reminders

    print_json(run_reminders(as_of=args.now).as_dict())
    return EXIT_OK


def cmd_scheduler(args: argparse.Namespace) -> int:
    from workers.scheduler import run_scheduler

    settings = get_settings()
    # Its job lines are at INFO, as the worker's processed lines; DEBUG makes both verbose.
    configure_logging("DEBUG" if settings.log_level == "DEBUG" else "INFO", settings.log_format)
    return run_scheduler()


def cmd_schema(args: argparse.Namespace) -> int:
    from models.messages import json_schemas

    print_json(json_schemas())
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.runner import exec_worker

    # Read (or generated) once before the processes start: a key file left empty or too
    # short would otherwise fail only the emails that carry a code, one by one.
    get_settings().secret_key_bytes()
    return exec_worker(processes=args.processes, threads=args.threads)


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    return run_demo(timeout=args.timeout)


def cmd_embedded_redis(args: argparse.Namespace) -> int:
    from workers import embedded_redis

    settings = get_settings()
    if args.action == "start":
        url, started = embedded_redis.ensure_running(settings.data_dir)
        print_json({"url": url, "started": started})
    elif args.action == "stop":
        print_json({"stopped": embedded_redis.stop(settings.data_dir)})
    else:
        print_json({"url": embedded_redis.url_for(settings.data_dir)})
    return EXIT_OK


# -- parser ------------------------------------------------------------------


def whole_number(*, low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number from ``low`` to ``high`` (no bound when None)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {value[:40]!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        if high is not None and number > high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contract-dispatch",
        description="Send contracts for signature: binding, access codes, emails, on Dramatiq.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    workspace = commands.add_parser("workspace", help="manage workspaces")
    workspace_commands = workspace.add_subparsers(dest="workspace_command", required=True, metavar="ACTION")
    workspace_set = workspace_commands.add_parser(
        "set", help="create or update a workspace and its resource groups"
    )
    workspace_set.add_argument("workspace_id", help="the workspace's id")
    workspace_set.add_argument(
        "--resource-group",
        action="append",
        required=True,
        metavar="ID",
        help="one of its resource groups (repeat for each; replaces the ones it had)",
    )
    workspace_set.set_defaults(handler=cmd_workspace_set)
    workspace_list = workspace_commands.add_parser(
        "list", help="every workspace and its resource groups (read-only)"
    )
    workspace_list.add_argument("--json", action="store_true", help="one JSON array")
    workspace_list.set_defaults(handler=cmd_workspace_list)
    workspace_show = workspace_commands.add_parser(
        "show", help="one workspace and its resource groups, as JSON (exit 1 if unknown)"
    )
    workspace_show.add_argument("workspace_id", help="the workspace's id")
    workspace_show.set_defaults(handler=cmd_workspace_show)

    send = commands.add_parser("send-contract", help="check and enqueue a contract for signature")
    send.add_argument(
        "--contract-id",
        required=True,
        metavar="ID",
        help="the contract's id (letters, digits, '.', '_', '-')",
    )
    send.add_argument("--email", required=True, help="the client's address: the login, bound to --company")
    send.add_argument("--company", required=True, metavar="NAME", help="company legal name (case-sensitive)")
    send.add_argument(
        "--lead-source",
        required=True,
        choices=["bap", "network", "other"],
        help="where the lead came from (bap: the Bureaux à Partager marketplace)",
    )
    send.add_argument("--workspace", required=True, metavar="ID", help="the workspace sending the contract")
    send.add_argument(
        "--resource-group",
        metavar="ID",
        help="the client's resource group (needed when the workspace has several)",
    )
    send.add_argument(
        "--signatory",
        action="append",
        required=True,
        metavar="EMAIL[:Display name]",
        help="a manager told when the client signs (repeat for each, one at least)",
    )
    send.add_argument(
        "--section",
        action="append",
        required=True,
        metavar="ID[:Title]",
        help="a section the client must accept (repeat for each, one at least)",
    )
    send.add_argument("--title", help="the contract's title in the emails")
    send.add_argument(
        "--locale", choices=["fr", "en"], default="fr", help="the emails' language (default fr)"
    )
    send.set_defaults(handler=cmd_send_contract)

    from workers.cli_bulk import add_commands as add_bulk_commands

    add_bulk_commands(commands)

    notify = commands.add_parser("notify-signatories", help="record a signature and tell the signatories")
    notify.add_argument("--contract-id", required=True, metavar="ID", help="the contract the client signed")
    notify.add_argument(
        "--legal-name", required=True, metavar="NAME", help="the company legal name signed for"
    )
    notify.add_argument(
        "--accepted-section",
        action="append",
        required=True,
        metavar="ID",
        help="a section the client accepted (repeat for each: every section sent is needed)",
    )
    notify.add_argument("--registration-number", metavar="TEXT", help="the company's registration number")
    notify.add_argument("--signer-name", metavar="TEXT", help="who signed for the company")
    notify.set_defaults(handler=cmd_notify_signatories)

    from workers.cli_contract_status import add_commands as add_contract_status_commands

    add_contract_status_commands(commands)

    cancel = commands.add_parser("cancel-contract", help="cancel a contract not signed yet")
    cancel.add_argument("--contract-id", required=True, metavar="ID", help="the contract to cancel")
    cancel.add_argument("--reason", metavar="TEXT", help="why, kept with the contract")
    cancel.set_defaults(handler=cmd_cancel_contract)

    resend = commands.add_parser("resend-invitation", help="send the invitation again and restart reminders")
    resend.add_argument(
        "--contract-id", required=True, metavar="ID", help="the contract whose invitation is sent again"
    )
    resend.set_defaults(handler=cmd_resend_invitation)

    reminders = commands.add_parser("reminders", help="reminders of contracts not signed yet")
    reminder_commands = reminders.add_subparsers(dest="reminders_command", required=True, metavar="ACTION")
    reminders_run = reminder_commands.add_parser(
        "run", help="run one reminder sweep now (prints what it did)"
    )
    reminders_run.add_argument(
        "--now",
        type=_aware_datetime,
        metavar="ISO-8601",
        help="act as if it were this time, e.g. 2026-12-01T10:00:00+01:00",
    )
    reminders_run.set_defaults(handler=cmd_reminders_run)

    scheduler = commands.add_parser("scheduler", help="enqueue reminder sweeps and housekeeping on schedule")
    scheduler.set_defaults(handler=cmd_scheduler)

    worker = commands.add_parser("worker", help="run the Dramatiq worker for all queues")
    worker.add_argument(
        "--processes",
        type=whole_number(),
        default=os.cpu_count() or 1,
        help="worker processes (default: the cores)",
    )
    worker.add_argument(
        "--threads",
        type=whole_number(),
        default=DEFAULT_WORKER_THREADS,
        help=f"threads per process (default {DEFAULT_WORKER_THREADS})",
    )
    worker.set_defaults(handler=cmd_worker)

    demo = commands.add_parser("demo", help="send, deliver and sign a sample contract on embedded defaults")
    demo.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    demo.set_defaults(handler=cmd_demo)

    schema = commands.add_parser("schema", help="print the JSON Schemas of the public messages")
    schema.set_defaults(handler=cmd_schema)

    from workers.cli_dead_letters import add_commands as add_dead_letter_commands

    add_dead_letter_commands(commands)

    from workers.cli_status import add_commands as add_status_commands

    add_status_commands(commands)

    from workers.ops.health import add_commands as add_health_commands

    add_health_commands(commands)

    from workers.cli_metrics import add_commands as add_metrics_commands

    add_metrics_commands(commands)

    from workers.cli_reports import add_commands as add_report_commands

    add_report_commands(commands)

    from workers.cli_accounts import add_commands as add_account_commands

    add_account_commands(commands)

    redis_cmd = commands.add_parser("embedded-redis", help="the embedded Redis used when REDIS_URL is unset")
    redis_cmd.add_argument(
        "action", choices=["start", "stop", "url"], help="start it, stop it, or print its URL (as JSON)"
    )
    redis_cmd.set_defaults(handler=cmd_embedded_redis)
    _name_command_parsers(parser)
    return parser


def _name_command_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's parser as the ``command_parser`` of what it parses.

    An unknown option is then refused with the usage of the command it was given
    to, not the top-level usage argparse would print.
    """
    # argparse keeps no public list of a parser's subcommands.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command_parser in action.choices.values():
                command_parser.set_defaults(command_parser=command_parser)
                _name_command_parsers(command_parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser: argparse.ArgumentParser = getattr(args, "command_parser", parser)
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        settings = get_settings()
    except ValidationError as error:
        # Without the input values: a malformed secret must not be echoed.
        problems = configuration_problems(error)
        # A command may report it in its own shape (health: unhealthy, exit 1).
        on_configuration_error: Callable[[argparse.Namespace, list[str]], int] | None = getattr(
            args, "on_configuration_error", None
        )
        if on_configuration_error is not None:
            return on_configuration_error(args, problems)
        for problem_text in problems:
            sys.stderr.write(f"configuration error: {problem_text}\n")
        return EXIT_UNAVAILABLE
    configure_logging(settings.log_level, settings.log_format)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        code = handler(args)
        # Here, where it can be answered, rather than when Python flushes at exit.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader of stdout went away (`| head -c 100`). Python would report the
        # pipe again, with a traceback, when it flushes stdout at exit. The same answer
        # whether the last write was buffered or not (PYTHONUNBUFFERED), so a script
        # sees one code for one outcome; what the command did before stands.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.stderr.write(
            "stdout was closed by its reader: the output was not all written (what the command did stands)\n"
        )
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the command stopped there\n")
        return EXIT_INTERRUPTED
    except Rejected as error:
        return _refuse(error)
    except (TransientError, ConfigurationError, OperationalError) as error:
        sys.stderr.write(f"unavailable: {unavailable_reason(error)}\n")
        return EXIT_UNAVAILABLE
    except BROKER_ERRORS as error:
        # Redis or RabbitMQ failed during a command that does not expect it (dead-letter
        # retry or purge, a reminder sweep's enqueue): what was done is in SQL, and
        # running the command again finishes it.
        sys.stderr.write(f"unavailable: the broker {broker_problem(error)}\n")
        return EXIT_UNAVAILABLE
    except DispatchError as error:
        sys.stderr.write(f"error: {error}\n")
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
