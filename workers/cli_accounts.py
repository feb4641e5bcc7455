"""``contract-dispatch verify-code`` and ``set-password``: a client's first login.

Exit codes: 0 the code is valid / the password is set; 1 the code is refused
(wrong, expired, used, locked or an unknown email: one answer for all, so the
command does not tell whether an address has an account); 2 bad input (the
new password breaks the policy, or none was given).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from models.errors import Rejected
from models.first_login import AccessCodeRefused, PasswordRefused

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2

#: Longest line read as a password, in characters: more than any policy allows,
#: so an over-long password is refused by the policy rather than cut.
_STDIN_LINE_LIMIT = 4096


def _answer(args: argparse.Namespace, result: dict[str, Any], error: Rejected | None, exit_code: int) -> int:
    if args.json:
        payload = {**result, "error": error.as_dict() if error is not None else None}
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    if error is not None:
        sys.stderr.write(f"{error.code}: {error.message}\n")
    return exit_code


def _read_password() -> str | None:
    """One line from stdin, never echoed: through getpass on a terminal; None for none.

    Read as bytes: a line that is not UTF-8 keeps its undecodable bytes as lone
    surrogates, which the password policy refuses by name.
    """
    if sys.stdin is None:  # started with stdin closed
        return None
    if sys.stdin.isatty():
        return getpass.getpass("New password: ")
    line = sys.stdin.buffer.readline(_STDIN_LINE_LIMIT)
    if not line:
        return None
    return line.decode("utf-8", "surrogateescape").rstrip("\r\n")


def cmd_verify_code(args: argparse.Namespace) -> int:
    from contract_dispatch import verify_code

    if verify_code(args.email, args.code):
        if not args.json:
            sys.stdout.write("valid\n")
        return _answer(args, {"valid": True}, None, EXIT_OK)
    return _answer(args, {"valid": False}, AccessCodeRefused(), EXIT_REFUSED)


def cmd_set_password(args: argparse.Namespace) -> int:
    from contract_dispatch import set_password

    password = _read_password()
    if not password:
        missing = PasswordRefused("No password was given: write the new password as one line on stdin.")
        return _answer(args, {"password_set": False}, missing, EXIT_BAD_INPUT)
    try:
        set_password(args.email, args.code, password)
    except PasswordRefused as error:
        return _answer(args, {"password_set": False}, error, EXIT_BAD_INPUT)
    except AccessCodeRefused as error:
        return _answer(args, {"password_set": False}, error, EXIT_REFUSED)
    if not args.json:
        sys.stdout.write("password set: first login done\n")
    return _answer(args, {"password_set": True}, None, EXIT_OK)


def add_commands(commands: Any) -> None:
    """Register ``verify-code`` and ``set-password``."""
    verify = commands.add_parser(
        "verify-code", help="check a client's temporary access code (exit 0 valid, 1 not)"
    )
    verify.add_argument("--email", required=True, help="the client's address (the login)")
    verify.add_argument("--code", required=True, help="the temporary password from the invitation")
    verify.add_argument("--json", action="store_true", help="one JSON object on stdout")
    verify.set_defaults(handler=cmd_verify_code)

    set_pw = commands.add_parser(
        "set-password",
        help="first login: spend the access code and set the password read from stdin (one line)",
    )
    set_pw.add_argument("--email", required=True, help="the client's address (the login)")
    set_pw.add_argument("--code", required=True, help="the temporary password from the invitation")
    set_pw.add_argument("--json", action="store_true", help="one JSON object on stdout")
    set_pw.set_defaults(handler=cmd_set_password)
