"""The console backend: prints each email to standard output (development only)."""

from __future__ import annotations

import sys
import threading

from workers.email.message import OutgoingEmail
from workers.email.mime import build_mime

_print_lock = threading.Lock()


class ConsoleBackend:
    """Writes the whole message to stdout, not to the logs (it may hold an access code)."""

    name = "console"

    def __init__(self, *, mail_domain: str) -> None:
        self.mail_domain = mail_domain

    def send(self, email: OutgoingEmail) -> str:
        message = build_mime(email, mail_domain=self.mail_domain)
        with _print_lock:
            sys.stdout.write(message.as_string() + "\n")
            sys.stdout.flush()
        return str(message["Message-ID"]).strip("<>")
