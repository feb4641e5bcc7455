"""A RabbitMQ virtual host of its own, for tests and benchmarks: nothing there touches another's queues."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

#: RabbitMQ's management API, used to create the virtual host where
#: ``rabbitmqctl`` cannot (not installed, or not allowed to this user).
MANAGEMENT_URL = os.environ.get("TEST_RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")

#: How long ``rabbitmqctl`` or the management API may take for one command, in seconds.
RABBITMQCTL_TIMEOUT_SECONDS = 30


class VhostUnavailable(Exception):
    """No virtual host could be created (the message says why)."""


class _VhostAdmin:
    """Creates and deletes a virtual host with ``rabbitmqctl``, else RabbitMQ's management API."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self.password = password

    def create(self, vhost: str) -> str | None:
        """Create ``vhost`` with full rights for the user; None, or why it could not."""
        problems = []
        if shutil.which("rabbitmqctl") is not None:
            result = self._ctl("add_vhost", vhost)
            if result.returncode == 0:
                result = self._ctl("set_permissions", "-p", vhost, self.user, ".*", ".*", ".*")
                if result.returncode == 0:
                    return None
                self._ctl("delete_vhost", vhost)
            problems.append(f"rabbitmqctl: {result.stderr.strip()[:200]}")
        else:
            problems.append("rabbitmqctl is not installed")
        try:
            self._api("PUT", f"/api/vhosts/{quote(vhost, safe='')}", None)
            rights = {"configure": ".*", "write": ".*", "read": ".*"}
            self._api("PUT", f"/api/permissions/{quote(vhost, safe='')}/{quote(self.user)}", rights)
            return None
        except OSError as exc:
            problems.append(f"management API at {MANAGEMENT_URL}: {exc}")
        return "; ".join(problems)

    def delete(self, vhost: str) -> None:
        if shutil.which("rabbitmqctl") is not None and self._ctl("delete_vhost", vhost).returncode == 0:
            return
        with contextlib.suppress(OSError):
            self._api("DELETE", f"/api/vhosts/{quote(vhost, safe='')}", None)

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-q", *args],
            capture_output=True,
            text=True,
            timeout=RABBITMQCTL_TIMEOUT_SECONDS,
            check=False,
        )

    def _api(self, method: str, path: str, body: dict[str, str] | None) -> None:
        request = urllib.request.Request(  # noqa: S310 - a fixed http:// base URL
            MANAGEMENT_URL + path,
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic "
                + base64.b64encode(f"{self.user}:{self.password}".encode()).decode(),
            },
        )
        with urllib.request.urlopen(request, timeout=RABBITMQCTL_TIMEOUT_SECONDS):  # noqa: S310
            pass


@contextlib.contextmanager
def virtual_host(base_url: str, *, prefix: str) -> Iterator[str]:
    """The AMQP URL of a new virtual host on ``base_url``'s server, deleted at the end.

    Raises ``VhostUnavailable`` when it cannot be created.
    """
    parts = urlsplit(base_url)
    admin = _VhostAdmin(parts.username or "guest", parts.password or "guest")
    vhost = f"{prefix}-{uuid.uuid4().hex[:10]}"
    problem = admin.create(vhost)
    if problem is not None:
        raise VhostUnavailable(problem)
    try:
        yield f"{base_url.rstrip('/')}/{quote(vhost, safe='')}"
    finally:
        admin.delete(vhost)
