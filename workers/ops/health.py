"""``contract-dispatch health``: can this host do its work right now?

Four checks, run at once, each bounded by its own timeout so that an unreachable
Redis or database makes the command answer "unhealthy" within a few seconds
instead of hanging (a container health check that hangs is worse than one that
fails):

- ``redis``: PING on the broker (``REDIS_URL``, or the embedded server, which this
  command never starts).
- ``database``: ``SELECT 1`` on ``DATABASE_URL``, and that it takes writes
  (PostgreSQL: not read-only; SQLite: the file exists, it and its directory are
  writable; this command never creates it).
- ``email``: the email backend's configuration (sendgrid: an API key and a
  well-formed API host; file: ``OUTBOX_DIR`` writable; console: nothing to check).
- ``workers``: at least one registered worker process whose last broker heartbeat
  is younger than ``HEARTBEAT_TIMEOUT_MS`` (optionally one on this host).

No detail ever holds a secret: locations are printed without credentials, and
every detail is scrubbed of the API key, the secret key and the URL passwords.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.settings import Settings, broker_nodes

#: Each check gives up after this long, in seconds (``--timeout``). The checks run
#: at the same time, so the command answers within about this long.
DEFAULT_TIMEOUT_SECONDS = 3.0

#: libpq counts its connect timeout in whole seconds and treats less than 2 as 2.
_MIN_PG_CONNECT_TIMEOUT_SECONDS = 2

#: How much longer than its own timeout a check may take before it is reported
#: as not answering, in seconds.
_TIMEOUT_MARGIN_SECONDS = 1.0

#: The order checks are run and shown in.
CHECKS = ("redis", "database", "email", "workers")


@dataclass
class CheckResult:
    """One check's verdict."""

    name: str
    ok: bool
    #: Why it failed, or what was found; never a secret.
    detail: str
    #: How long the check took, in milliseconds.
    duration_ms: float


@dataclass
class HealthReport:
    """Every check that ran; healthy when each one is ok."""

    checks: list[CheckResult]

    @property
    def healthy(self) -> bool:
        return all(check.ok for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        """``{"healthy": bool, "checks": {name: {"ok", "detail", "duration_ms"}}}``."""
        return {
            "healthy": self.healthy,
            "checks": {
                check.name: {"ok": check.ok, "detail": check.detail, "duration_ms": check.duration_ms}
                for check in self.checks
            },
        }

    def lines(self) -> list[str]:
        """The human form: a verdict, then one line per check."""
        failed = [check.name for check in self.checks if not check.ok]
        head = "healthy" if not failed else f"unhealthy: {', '.join(failed)}"
        return [head] + [f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]


class CheckFailed(Exception):
    """A check's reason for failing, already worded for people."""


# -- secrets never leave ------------------------------------------------------------


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the settings hold: the keys and any password in a URL."""
    found: list[str] = []
    for secret in (settings.sendgrid_api_key, settings.secret_key):
        if secret is not None:
            found.append(secret.get_secret_value())
    urls = (settings.redis_url, settings.database_url, settings.sendgrid_api_host)
    for url in [*urls, *broker_nodes(settings.broker_url or "")]:
        if not url:
            continue
        with contextlib.suppress(ValueError):
            parts = urlsplit(url)
            found.append(parts.password or "")
            found.extend(value for key, value in parse_qsl(parts.query) if "password" in key.lower())
    # Longest first, so that a secret containing another is replaced whole.
    return sorted({value for value in found if value}, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, "***")
    return text


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message``; SQLAlchemy's wrapper is unwrapped to the driver's error."""
    inner = getattr(exc, "orig", None)
    if isinstance(inner, BaseException):
        exc = inner
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


# -- the checks -------------------------------------------------------------------


def redis_client(settings: Settings, timeout: float) -> redis.Redis:
    """A client that tries once and waits at most ``timeout`` seconds per step.

    redis-py retries a failed command (three times, with backoff) by default; a
    health check must report the outage instead of riding it out.
    """
    from workers import embedded_redis

    url = settings.redis_url or embedded_redis.url_for(settings.data_dir)
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _redis_location(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix socket {kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def check_redis(client: redis.Redis) -> str:
    started = time.monotonic()
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CheckFailed(
            f"Redis at {_redis_location(client)} does not answer: {describe_error(exc)}"
        ) from None
    return f"PONG in {(time.monotonic() - started) * 1000:.1f} ms (Redis at {_redis_location(client)})"


def check_database(settings: Settings, timeout: float) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from workers.database import database_location, normalize_database_url

    url = make_url(normalize_database_url(settings.effective_database_url))
    where = database_location(url)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:" and not Path(url.database).exists():
            # Connecting would create an empty database: say what is missing instead.
            raise CheckFailed(f"{where} does not exist (the worker creates it when it starts)")
        if url.database and url.database != ":memory:":
            _writable_sqlite(Path(url.database), where)
        connect_args["timeout"] = timeout
    elif url.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = max(_MIN_PG_CONNECT_TIMEOUT_SECONDS, math.ceil(timeout))
    # A throwaway engine: no pool to keep, and no table creation (get_engine does that).
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    started = time.monotonic()
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1")).scalar_one()
            if url.get_backend_name() == "postgresql":
                # A standby (or a read-only default) answers SELECT 1 but refuses every write.
                read_only = connection.execute(text("SHOW transaction_read_only")).scalar_one()
                if read_only == "on":
                    raise CheckFailed(f"{where} is read-only (transaction_read_only = on)")
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckFailed(f"{where}: {describe_error(exc)}") from None
    finally:
        engine.dispose()
    return f"SELECT 1 in {(time.monotonic() - started) * 1000:.1f} ms ({where})"


def _writable_sqlite(path: Path, where: str) -> None:
    """The worker writes the file, and SQLite writes its journal next to it."""
    if not path.is_file():
        raise CheckFailed(f"{where} is not a regular file")
    for needed in (path, path.parent):
        if not os.access(needed, os.W_OK):
            raise CheckFailed(f"{where} is not writable ({needed} is read-only)")


def check_email(settings: Settings) -> str:
    backend = settings.email_backend
    if backend == "console":
        return "console: emails are printed, not sent"
    if backend == "sendgrid":
        key = settings.sendgrid_api_key.get_secret_value() if settings.sendgrid_api_key else ""
        if not key.strip():
            raise CheckFailed("EMAIL_BACKEND=sendgrid but SENDGRID_API_KEY is not set")
        if any(ch.isspace() or not ch.isprintable() for ch in key):
            # It goes into an HTTP header as is: SendGrid would answer 401 to every email.
            raise CheckFailed("SENDGRID_API_KEY contains spaces or control characters")
        host = _well_formed_host(settings.sendgrid_api_host)
        return f"sendgrid: API key set, API host {host}, timeout {settings.sendgrid_timeout:g} s"
    outbox = settings.effective_outbox_dir
    return f"file: {_writable_outbox(outbox)}"


def _well_formed_host(value: str) -> str:
    """The API host without any credentials, or CheckFailed."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise CheckFailed("SENDGRID_API_HOST is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CheckFailed(
            "SENDGRID_API_HOST must be an http(s) URL with a host, e.g. https://api.sendgrid.com"
        )
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise CheckFailed(
            f"SENDGRID_API_HOST must be a base URL only (scheme and host), not {parts.scheme}://{parts.hostname}…"
        )
    return f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")


def _writable_outbox(outbox: Path) -> str:
    if outbox.exists():
        if not outbox.is_dir():
            raise CheckFailed(f"OUTBOX_DIR {outbox} is not a directory")
        try:
            # A dot file, like the backend's own temporary files: outbox readers skip them.
            with tempfile.NamedTemporaryFile(dir=outbox, prefix=".health-", suffix=".tmp"):
                pass
        except OSError as exc:
            raise CheckFailed(f"OUTBOX_DIR {outbox} is not writable: {describe_error(exc)}") from None
        return f"OUTBOX_DIR {outbox} is writable"
    # The backend creates the directory on its first email: its nearest existing parent must allow it.
    parent = outbox.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckFailed(f"OUTBOX_DIR {outbox} does not exist and {parent} is not writable")
    return f"OUTBOX_DIR {outbox} will be created in {parent}"


def check_workers(client: redis.Redis, settings: Settings, *, this_host: bool) -> str:
    """At least one registered worker heartbeating within HEARTBEAT_TIMEOUT_MS.

    Registered workers are in ``{ns}:__workers__`` (producers heartbeat too, but
    never register); their last heartbeats are scores in ``{ns}:__heartbeats__``,
    in epoch milliseconds. Alive means the same as in ``contract-dispatch status``.
    """
    from workers.middleware.maintenance import heartbeats_key, pid_namespace, workers_key

    namespace = settings.redis_namespace
    try:
        registered = client.hgetall(workers_key(namespace))
        ids = [_text(worker_id) for worker_id in registered]
        beats = client.zmscore(heartbeats_key(namespace), ids) if ids else []
    except redis.RedisError as exc:
        raise CheckFailed(f"cannot read the registered workers: {describe_error(exc)}") from None
    now_ms = time.time() * 1000
    host = socket.gethostname()
    here = (host, pid_namespace())
    silences: list[float] = []
    for info_json, beat in zip(registered.values(), beats, strict=True):
        if this_host and not _registered_here(info_json, here):
            continue
        silences.append((now_ms - beat) / 1000 if beat is not None else math.inf)
    where = f"on host {host}" if this_host else f"in Redis namespace {namespace!r}"
    if not silences:
        raise CheckFailed(f"no worker registered {where}")
    timeout_s = settings.heartbeat_timeout_ms / 1000
    alive = [silence for silence in silences if silence < timeout_s]
    if not alive:
        freshest = min(silences)
        last = f"last heartbeat {freshest:.1f} s ago" if math.isfinite(freshest) else "no heartbeat left"
        raise CheckFailed(
            f"no live worker {where}: {len(silences)} registered, {last} "
            f"(HEARTBEAT_TIMEOUT_MS={settings.heartbeat_timeout_ms})"
        )
    plural = "s" if len(alive) > 1 else ""
    return f"{len(alive)} live worker{plural} {where}, freshest heartbeat {max(min(alive), 0.0):.1f} s ago"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _registered_here(info_json: Any, here: tuple[str, str | None]) -> bool:
    """Whether a registration is of this host name and PID namespace (this container).

    A registration without a namespace (an earlier version's, or a system that names
    none) matches by host name alone, as does a command that cannot read its own.
    """
    try:
        info = json.loads(info_json)
    except ValueError:
        return False
    if not isinstance(info, dict) or str(info.get("host")) != here[0]:
        return False
    namespace, own = info.get("pid_namespace"), here[1]
    return namespace is None or own is None or namespace == own


# -- running them ------------------------------------------------------------------


def _run_bounded(
    checks: dict[str, Callable[[], str]], timeout: float, secrets: list[str]
) -> list[CheckResult]:
    """Run every check in its own daemon thread; a check still running after ``timeout`` fails.

    Daemon threads: a driver stuck past its own timeouts must not keep the
    command from exiting.
    """
    results: dict[str, CheckResult] = {}
    lock = threading.Lock()

    def run(name: str, check: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            ok, detail = True, check()
        except CheckFailed as failure:
            ok, detail = False, str(failure)
        except Exception as exc:
            ok, detail = False, f"check crashed: {describe_error(exc)}"
        with lock:
            results[name] = CheckResult(
                name, ok, redact(detail, secrets), round((time.monotonic() - started) * 1000, 1)
            )

    started = time.monotonic()
    threads = [
        threading.Thread(target=run, args=(name, check), name=f"health-{name}", daemon=True)
        for name, check in checks.items()
    ]
    for thread in threads:
        thread.start()
    deadline = started + timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    report = []
    with lock:
        for name in checks:
            report.append(
                results.get(name)
                or CheckResult(
                    name,
                    False,
                    f"no answer within {timeout:g} s",
                    round((time.monotonic() - started) * 1000, 1),
                )
            )
    return report


def run_health_checks(
    settings: Settings,
    *,
    workers: bool = True,
    this_host: bool = False,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> HealthReport:
    """Every check, at once, in about ``timeout`` seconds at most (plus a margin for the threads).

    ``timeout`` is in seconds; a PostgreSQL connection waits at least 2 (libpq's minimum).
    """
    client = redis_client(settings, timeout)
    checks: dict[str, Callable[[], str]] = {
        "redis": lambda: check_redis(client),
        "database": lambda: check_database(settings, timeout),
        "email": lambda: check_email(settings),
    }
    if settings.uses_rabbitmq:
        # The broker and its consumers are RabbitMQ's; the workers also register in
        # Redis, which is how one host's own are told (--this-host).
        from workers.ops.health_rabbitmq import check_rabbitmq, check_rabbitmq_workers

        checks["broker"] = lambda: check_rabbitmq(settings, timeout)
        if workers and this_host:
            checks["workers"] = lambda: check_workers(client, settings, this_host=True)
        elif workers:
            checks["workers"] = lambda: check_rabbitmq_workers(settings, timeout)
    elif workers:
        checks["workers"] = lambda: check_workers(client, settings, this_host=this_host)
    # The network checks get a little longer than their sockets' timeout (libpq's is
    # never under 2 s), so that a socket timing out is reported with its own error
    # rather than as "no answer".
    bound = max(timeout, _MIN_PG_CONNECT_TIMEOUT_SECONDS) + _TIMEOUT_MARGIN_SECONDS
    try:
        return HealthReport(_run_bounded(checks, bound, secrets_of(settings)))
    finally:
        with contextlib.suppress(Exception):
            client.close()


# -- the command -------------------------------------------------------------------

#: Exit codes (the CLI's): healthy, or not.
EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1


def _emit(report: HealthReport, *, as_json: bool) -> int:
    if as_json:
        sys.stdout.write(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(report.lines()) + "\n")
    return EXIT_HEALTHY if report.healthy else EXIT_UNHEALTHY


def cmd_health(args: argparse.Namespace) -> int:
    from workers.settings import get_settings

    settings = get_settings()
    # A key file left empty or too short fails every new client's email and first login.
    problem = settings.secret_key_problem()
    if problem is not None:
        return configuration_unusable(args, [problem])
    report = run_health_checks(
        settings, workers=not args.no_workers, this_host=args.this_host, timeout=args.timeout
    )
    return _emit(report, as_json=args.json)


def configuration_unusable(args: argparse.Namespace, problems: list[str]) -> int:
    """The settings cannot be read at all: one failed ``configuration`` check, same output shape."""
    report = HealthReport([CheckResult("configuration", False, "; ".join(problems), 0.0)])
    return _emit(report, as_json=args.json)


def _timeout(value: str) -> float:
    seconds = float(value)
    if not 0 < seconds <= 60:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 60 seconds")
    return seconds


def add_commands(commands: Any) -> None:
    """Register ``health``."""
    parser = commands.add_parser(
        "health", help="check Redis, the database, the email backend and live workers (exit 1 if unhealthy)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object")
    # One or the other: skipping the worker check leaves nothing for --this-host to narrow.
    workers = parser.add_mutually_exclusive_group()
    workers.add_argument(
        "--no-workers", action="store_true", help="skip the live-worker check (a producer or scheduler host)"
    )
    workers.add_argument(
        "--this-host",
        action="store_true",
        help="only count workers running on this host (a worker container)",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help=(
            "each check gives up after this long, in seconds; a PostgreSQL connection "
            f"waits at least {_MIN_PG_CONNECT_TIMEOUT_SECONDS} (default {DEFAULT_TIMEOUT_SECONDS:g})"
        ),
    )
    parser.set_defaults(handler=cmd_health, on_configuration_error=configuration_unusable)
