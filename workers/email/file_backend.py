"""The file backend: each email becomes one ``.eml`` file in OUTBOX_DIR."""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

from workers.email.message import OutgoingEmail
from workers.email.mime import build_mime

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class FileBackend:
    """Writes RFC 5322 files; the provider message id is the file name."""

    name = "file"

    def __init__(self, *, outbox_dir: Path, mail_domain: str) -> None:
        self.outbox_dir = outbox_dir
        self.mail_domain = mail_domain

    def send(self, email: OutgoingEmail) -> str:
        self.outbox_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        reference = _UNSAFE.sub("_", email.reference)[:120]
        # A random suffix: a duplicate send shows up as a second file, never
        # silently overwrites the first.
        name = f"{stamp}-{reference}-{secrets.token_hex(4)}.eml"
        data = build_mime(email, mail_domain=self.mail_domain).as_bytes()
        temporary = self.outbox_dir / f".{name}.tmp"
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # Readers never see a half-written file.
        temporary.rename(self.outbox_dir / name)
        return name
