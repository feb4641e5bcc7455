"""The one settings object, read from the environment (and ``.env``).

Every variable is documented in the README's configuration table; the defaults
below are what a fresh machine with nothing but Python gets.
"""

from __future__ import annotations

import functools
import os
import secrets
import time as clock
from dataclasses import dataclass
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.access_codes import AccessCodePolicy, HashParameters
from models.first_login import DEFAULT_MAX_FAILED_ATTEMPTS, DEFAULT_PASSWORD_MIN_LENGTH, PASSWORD_MAX_LENGTH
from models.reminders import DAY_NAMES, ReminderPolicy

#: Where embedded state lives when nothing else is configured (relative to the
#: working directory).
DEFAULT_DATA_DIR = Path(".data")

#: How long a temporary password stays valid, in days.
DEFAULT_ACCESS_CODE_TTL_DAYS = 7

#: Longest lifetime of a temporary password, in days: a longer one is not temporary
#: (and a lifetime past the calendar's end failed every code issued).
MAX_ACCESS_CODE_TTL_DAYS = 365

#: Upper bounds of the argon2id costs: 4 GiB of memory per hash, in KiB, 100
#: iterations, 64 lanes (argon2 itself would take more, and fail every hash).
MAX_ARGON2_MEMORY_KIB = 4 * 1024 * 1024
MAX_ARGON2_TIME_COST = 100
MAX_ARGON2_PARALLELISM = 64

#: Shortest SECRET_KEY accepted, in characters (a generated one has 64).
SECRET_KEY_MIN_LENGTH = 32

#: OWASP's argon2id minimum: 19 MiB of memory, 2 iterations, 1 lane.
DEFAULT_ARGON2_MEMORY_KIB = 19 * 1024
DEFAULT_ARGON2_TIME_COST = 2
DEFAULT_ARGON2_PARALLELISM = 1

#: How long an idle worker consumer waits before it polls its queue again, in
#: milliseconds. Dramatiq's default (1000) adds up to a second to each of a
#: contract's two hops on a quiet system; 50 keeps the end-to-end p99 near 60 ms
#: for about 2 % of a core per idle worker process (make bench).
DEFAULT_WORKER_TIMEOUT_MS = 50

#: The SendGrid client has no timeout of its own; this one is in seconds.
DEFAULT_SENDGRID_TIMEOUT_SECONDS = 10.0

#: Retry policy for transient failures (milliseconds and counts).
DEFAULT_MAX_RETRIES = 12
DEFAULT_MIN_BACKOFF_MS = 5_000
DEFAULT_MAX_BACKOFF_MS = 3_600_000

#: How long a worker may hold a delivery it is sending before another
#: worker may take it over, in seconds. Must outlast the provider timeout.
DEFAULT_SEND_LEASE_SECONDS = 30

#: A worker silent for this long is dead and its messages go back to their
#: queues, in milliseconds (Dramatiq's default is 60 s).
DEFAULT_HEARTBEAT_TIMEOUT_MS = 20_000

#: How often each worker process heartbeats and runs broker maintenance, in milliseconds.
DEFAULT_MAINTENANCE_INTERVAL_MS = 5_000

#: How often one queue-depth sample is stored for ``status --html``'s chart (one per
#: interval across all workers), in milliseconds.
DEFAULT_HISTORY_SAMPLE_INTERVAL_MS = 15_000

#: The worker's Prometheus endpoint. Loopback by default: a container sets
#: METRICS_HOST=0.0.0.0 (its loopback is unreachable from the scraper).
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9191

#: How long the database gauges one metrics endpoint reads serve every endpoint sharing its
#: Redis, in milliseconds: a fleet's endpoints read the whole-system figures (contracts per
#: status over the whole table) about once per this interval instead of once each per scrape.
DEFAULT_METRICS_DATABASE_MAX_AGE_MS = 10_000

#: How long a worker keeps retrying Redis through an outage before a command fails, in seconds.
DEFAULT_REDIS_OUTAGE_PATIENCE_SECONDS = 120.0

#: Reminders: sweep interval (minutes), delays after the invitation (days), sending window.
DEFAULT_REMINDER_SWEEP_MINUTES = 15
DEFAULT_REMINDER_DELAYS_DAYS = (3.0, 7.0, 14.0)
DEFAULT_REMINDER_WINDOW_DAYS = "mon-fri"
DEFAULT_REMINDER_WINDOW_START = "09:00"
DEFAULT_REMINDER_WINDOW_END = "18:00"
#: The longest reminder delay accepted, in days.
MAX_REMINDER_DELAY_DAYS = 365

#: Due reminders claimed per transaction by a sweep.
DEFAULT_REMINDER_BATCH_SIZE = 1000

#: BROKER_URL schemes: Dramatiq's Redis broker, or its RabbitMQ broker (AMQP 0-9-1).
REDIS_BROKER_SCHEMES = ("redis", "rediss")
AMQP_BROKER_SCHEMES = ("amqp", "amqps")
BROKER_SCHEMES = REDIS_BROKER_SCHEMES + AMQP_BROKER_SCHEMES
#: The SQL databases the service runs on.
DATABASE_BACKENDS = ("sqlite", "postgresql")

_URL_HINT = "Percent-encode the special characters of a password (/ as %2F, @ as %40, : as %3A, # as %23)."


def _scheme(url: str) -> str:
    """``redis`` of ``redis://…``, in lower case; empty when there is none."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _server_url(value: str | None, *, name: str, schemes: tuple[str, ...]) -> str | None:
    """``value`` (None when unset) if it is a URL of one of ``schemes`` that reads as host and port.

    The errors never quote it. An unencoded ``/`` or ``@`` in a password moves the
    split between password, host and port: the password would then be printed as
    a host or port in the connection errors of every command.
    """
    if not value:
        return None
    scheme = _scheme(value)
    if scheme not in schemes:
        starts = ", ".join(f"{s}://" for s in schemes[:-1]) + f" or {schemes[-1]}://"
        raise ValueError(f"{name} must start with {starts}")
    if scheme == "unix":
        return value
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"{name} cannot be read as a server URL. {_URL_HINT}") from None
    if not parts.hostname:
        raise ValueError(f"{name} names no host that can be read. {_URL_HINT}")
    if "@" in f"{parts.path}{parts.query}{parts.fragment}":
        # An unencoded / ? or # in the password ended the host part early: "u:12" would
        # be read as host and port, the rest of the password as the path.
        raise ValueError(f"{name} cannot be read as a server URL. {_URL_HINT}")
    return value


#: Refused sends answered per workspace and window before the producer-side check
#: stops answering (0: no limit), and that window, in seconds.
DEFAULT_REFUSAL_RATE_LIMIT = 30
DEFAULT_REFUSAL_RATE_WINDOW_SECONDS = 60

#: The actors whose retry policy can be set one by one.
RETRYING_ACTORS = ("send_contract", "notify_signatories", "deliver_email")

SECRET_KEY_FILE = "secret_key"  # noqa: S105 - a file name, not a secret


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How an actor retries transient failures (times in milliseconds)."""

    max_retries: int
    min_backoff_ms: int
    max_backoff_ms: int


class Settings(BaseSettings):
    """Runtime configuration. Field names map to upper-case environment variables."""

    # hide_input_in_errors: a check of the whole model quotes every value read
    # (the keys too, before they become secrets) in its error.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR, description="Embedded Redis, SQLite, outbox and secret key."
    )
    redis_url: str | None = Field(default=None, description="Broker; unset starts an embedded Redis.")
    redis_namespace: str = Field(
        default="dramatiq", min_length=1, description="Prefix of every broker key in Redis."
    )
    broker_url: str | None = Field(
        default=None,
        description="Message broker: redis(s):// or amqp(s)://; unset is REDIS_URL's Redis.",
    )
    database_url: str | None = Field(default=None, description="SQL database; unset uses SQLite in data_dir.")
    email_backend: Literal["sendgrid", "file", "console"] = "file"
    sendgrid_api_key: SecretStr | None = None
    sendgrid_api_host: str = "https://api.sendgrid.com"
    sendgrid_timeout: float = Field(default=DEFAULT_SENDGRID_TIMEOUT_SECONDS, gt=0, allow_inf_nan=False)
    mail_from: str = "no-reply@localhost"
    mail_from_name: str = "Contract Dispatch"
    app_base_url: str = "http://localhost:8000"
    display_timezone: str = Field(default="Europe/Paris", description="Time zone of dates shown in emails.")
    outbox_dir: Path | None = Field(
        default=None, description="File backend output; unset is data_dir/outbox."
    )
    secret_key: SecretStr | None = Field(default=None, description="Unset: generated into data_dir once.")
    access_code_ttl_days: float = Field(
        default=DEFAULT_ACCESS_CODE_TTL_DAYS, gt=0, le=MAX_ACCESS_CODE_TTL_DAYS, allow_inf_nan=False
    )
    argon2_memory_kib: int = Field(default=DEFAULT_ARGON2_MEMORY_KIB, ge=8, le=MAX_ARGON2_MEMORY_KIB)
    argon2_time_cost: int = Field(default=DEFAULT_ARGON2_TIME_COST, ge=1, le=MAX_ARGON2_TIME_COST)
    argon2_parallelism: int = Field(default=DEFAULT_ARGON2_PARALLELISM, ge=1, le=MAX_ARGON2_PARALLELISM)
    argon2_max_concurrent: int | None = Field(
        default=None,
        ge=1,
        description="argon2id hashes at once per process; unset: the cores shared among worker processes.",
    )
    worker_timeout_ms: int = Field(
        default=DEFAULT_WORKER_TIMEOUT_MS,
        ge=10,
        le=60_000,
        description="How long an idle worker waits before polling its queue again, in milliseconds.",
    )
    access_code_max_attempts: int = Field(
        default=DEFAULT_MAX_FAILED_ATTEMPTS, ge=1, description="Wrong codes that lock the current code."
    )
    password_min_length: int = Field(
        default=DEFAULT_PASSWORD_MIN_LENGTH, ge=8, le=PASSWORD_MAX_LENGTH, description="In characters."
    )
    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0)
    min_backoff_ms: int = Field(default=DEFAULT_MIN_BACKOFF_MS, ge=1)
    max_backoff_ms: int = Field(default=DEFAULT_MAX_BACKOFF_MS, ge=1)
    send_lease_seconds: int = Field(default=DEFAULT_SEND_LEASE_SECONDS, ge=1)
    send_contract_max_retries: int | None = Field(default=None, ge=0)
    send_contract_min_backoff_ms: int | None = Field(default=None, ge=1)
    send_contract_max_backoff_ms: int | None = Field(default=None, ge=1)
    notify_signatories_max_retries: int | None = Field(default=None, ge=0)
    notify_signatories_min_backoff_ms: int | None = Field(default=None, ge=1)
    notify_signatories_max_backoff_ms: int | None = Field(default=None, ge=1)
    deliver_email_max_retries: int | None = Field(default=None, ge=0)
    deliver_email_min_backoff_ms: int | None = Field(default=None, ge=1)
    deliver_email_max_backoff_ms: int | None = Field(default=None, ge=1)
    reminder_sweep_minutes: float = Field(default=DEFAULT_REMINDER_SWEEP_MINUTES, gt=0)
    reminder_delays_days: Annotated[tuple[float, ...], NoDecode] = DEFAULT_REMINDER_DELAYS_DAYS
    reminder_window_days: str = DEFAULT_REMINDER_WINDOW_DAYS
    reminder_window_start: time = time.fromisoformat(DEFAULT_REMINDER_WINDOW_START)
    reminder_window_end: time = time.fromisoformat(DEFAULT_REMINDER_WINDOW_END)
    reminder_timezone: str = "Europe/Paris"
    reminder_batch_size: int = Field(default=DEFAULT_REMINDER_BATCH_SIZE, ge=1)
    heartbeat_timeout_ms: int = Field(default=DEFAULT_HEARTBEAT_TIMEOUT_MS, ge=1000)
    maintenance_interval_ms: int = Field(default=DEFAULT_MAINTENANCE_INTERVAL_MS, ge=100)
    history_sample_interval_ms: int = Field(default=DEFAULT_HISTORY_SAMPLE_INTERVAL_MS, ge=100)
    redis_outage_patience_seconds: float = Field(default=DEFAULT_REDIS_OUTAGE_PATIENCE_SECONDS, ge=0)
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text or JSON objects."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING", description="Log level of CLI commands (the worker logs at INFO)."
    )
    metrics_host: str = Field(
        default=DEFAULT_METRICS_HOST, description="Address the worker's Prometheus endpoint binds to."
    )
    metrics_port: int = Field(
        default=DEFAULT_METRICS_PORT, ge=0, le=65535, description="Its port; 0 runs no endpoint."
    )
    metrics_dir: Path | None = Field(
        default=None,
        description="Worker processes' metric files; unset is data_dir/metrics/METRICS_PORT.",
    )
    metrics_database_max_age_ms: int = Field(
        default=DEFAULT_METRICS_DATABASE_MAX_AGE_MS,
        ge=0,
        description="How old the database gauges of a scrape may be (shared through Redis), "
        "in milliseconds; 0 reads the database at every scrape.",
    )
    refusal_rate_limit: int = Field(
        default=DEFAULT_REFUSAL_RATE_LIMIT,
        ge=0,
        description="Refused sends answered per workspace and window; 0 turns the limit off.",
    )
    refusal_rate_window_seconds: int = Field(
        default=DEFAULT_REFUSAL_RATE_WINDOW_SECONDS, ge=1, description="That window, in seconds."
    )

    @model_validator(mode="after")
    def _one_redis(self) -> Settings:
        # A redis:// BROKER_URL is the service's one Redis: status, health and the
        # scheduler read REDIS_URL, so it becomes REDIS_URL too.
        if self.broker_url is None or self.uses_rabbitmq:
            return self
        if self.redis_url is None:
            self.redis_url = self.broker_url
        elif self.redis_url != self.broker_url:
            raise ValueError("BROKER_URL and REDIS_URL name two Redis servers: set only one of them")
        return self

    @model_validator(mode="after")
    def _argon2_memory_holds_its_lanes(self) -> Settings:
        # argon2 needs 8 KiB per lane; fewer failed every hash, so every new client's send.
        if self.argon2_memory_kib < 8 * self.argon2_parallelism:
            raise ValueError("ARGON2_MEMORY_KIB must be at least 8 x ARGON2_PARALLELISM")
        return self

    @field_validator("secret_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_secret_key(value.get_secret_value(), name="SECRET_KEY")
        return value

    @field_validator("sendgrid_api_host")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if _scheme(value) not in ("http", "https") or not urlsplit(value).hostname:
            raise ValueError("SENDGRID_API_HOST must be an http(s) URL with a host")
        return value

    @model_validator(mode="after")
    def _lease_outlasts_a_send(self) -> Settings:
        if self.send_lease_seconds <= self.sendgrid_timeout:
            raise ValueError("SEND_LEASE_SECONDS must be longer than SENDGRID_TIMEOUT")
        return self

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str | None) -> str | None:
        if value and ";" in value and _scheme(value.strip()) in AMQP_BROKER_SCHEMES:
            # Several RabbitMQ nodes, each checked; kept as Dramatiq splits them (on ";").
            nodes = broker_nodes(value)
            for node in nodes:
                _server_url(node, name="BROKER_URL", schemes=AMQP_BROKER_SCHEMES)
            return ";".join(nodes)
        return _server_url(value, name="BROKER_URL", schemes=BROKER_SCHEMES)

    @field_validator("redis_url")
    @classmethod
    def _known_redis(cls, value: str | None) -> str | None:
        return _server_url(value, name="REDIS_URL", schemes=(*REDIS_BROKER_SCHEMES, "unix"))

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if not value:
            return None
        # Parsed as the engine will parse it; the errors never quote the URL (it may hold a password).
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except (ArgumentError, ValueError):
            raise ValueError(f"DATABASE_URL is not a database URL. {_URL_HINT}") from None
        if url.get_backend_name() not in DATABASE_BACKENDS:
            raise ValueError("DATABASE_URL must start with sqlite:// or postgresql://")
        if "@" in (url.host or "") or "/" in (url.host or ""):
            raise ValueError(f"DATABASE_URL's host cannot be read. {_URL_HINT}")
        return value

    @field_validator("app_base_url", "sendgrid_api_host")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("reminder_delays_days", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return tuple(float(part) for part in value.replace(" ", "").split(",") if part)
            except ValueError:
                # float()'s own message quotes the value.
                raise ValueError(
                    "reminder delays must be numbers of days separated by commas, e.g. 3,7,14"
                ) from None
        return value

    @field_validator("reminder_delays_days")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        # Written so that NaN, which compares false with everything, fails it.
        in_range = all(0 < delay <= MAX_REMINDER_DELAY_DAYS for delay in value)
        # Empty, the sweep would still send one reminder (its cap counts from the first).
        if not value or not in_range or list(value) != sorted(set(value)):
            raise ValueError(
                f"reminder delays must be one or more, positive, at most {MAX_REMINDER_DELAY_DAYS} "
                "days, and increasing, e.g. 3,7,14"
            )
        return value

    @model_validator(mode="after")
    def _window_opens_before_it_closes(self) -> Settings:
        # Otherwise no moment is ever inside it, and every reminder is postponed for ever.
        if self.reminder_window_start >= self.reminder_window_end:
            raise ValueError(
                "REMINDER_WINDOW_START must be earlier than REMINDER_WINDOW_END "
                "(the window is within one day)"
            )
        return self

    @model_validator(mode="after")
    def _backoff_grows_to_its_cap(self) -> Settings:
        # Otherwise every retry would wait the cap: the first delay is never shorter.
        for actor_name in ("", *RETRYING_ACTORS):
            policy = self.retry_policy(actor_name)
            if policy.min_backoff_ms > policy.max_backoff_ms:
                prefix = f"{actor_name.upper()}_" if actor_name else ""
                defaults = " (each defaults to the global one)" if actor_name else ""
                raise ValueError(
                    f"{prefix}MIN_BACKOFF_MS must not be over {prefix}MAX_BACKOFF_MS{defaults}: "
                    "retries wait the first, doubling up to the second"
                )
        return self

    @model_validator(mode="after")
    def _heartbeats_within_their_timeout(self) -> Settings:
        # A worker process whose threads are all busy heartbeats only this often: at
        # half its timeout or more, a live worker would be read as dead (its messages
        # handed to others while it still works on them).
        if self.maintenance_interval_ms * 2 > self.heartbeat_timeout_ms:
            raise ValueError(
                "MAINTENANCE_INTERVAL_MS must be at most half of HEARTBEAT_TIMEOUT_MS "
                "(each worker process heartbeats that often)"
            )
        return self

    @model_validator(mode="after")
    def _sendgrid_can_send_from(self) -> Settings:
        # SendGrid refuses a sender that is not an address: every email would be dead-lettered.
        if self.email_backend == "sendgrid":
            try:
                validate_email(self.mail_from, check_deliverability=False)
            except EmailNotValidError as error:
                raise ValueError(f"MAIL_FROM must be an address SendGrid can send from: {error}") from None
        return self

    @field_validator("reminder_window_days")
    @classmethod
    def _known_days(cls, value: str) -> str:
        parse_days(value)
        return value

    @field_validator("display_timezone", "reminder_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            # ZoneInfoNotFoundError is a KeyError, which pydantic would not report.
            raise ValueError("not a time zone of the IANA database, e.g. Europe/Paris") from None
        return value

    @field_validator("mail_from", "mail_from_name")
    @classmethod
    def _single_line(cls, value: str) -> str:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("must not contain control characters")
        return value

    @property
    def uses_rabbitmq(self) -> bool:
        """Whether BROKER_URL names a RabbitMQ broker (REDIS_URL then serves coordination only)."""
        if self.broker_url is None:
            return False
        return _scheme(self.broker_url) in AMQP_BROKER_SCHEMES

    @property
    def effective_database_url(self) -> str:
        """DATABASE_URL, or the embedded SQLite file under ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'contract-dispatch.db'}"

    @property
    def effective_outbox_dir(self) -> Path:
        """OUTBOX_DIR, or ``data_dir/outbox``."""
        return self.outbox_dir if self.outbox_dir is not None else self.data_dir / "outbox"

    @property
    def effective_metrics_dir(self) -> Path:
        """METRICS_DIR, or ``data_dir/metrics/{METRICS_PORT}`` (absolute: worker processes share it).

        One directory per port by default: two workers on one host listen on two
        ports, and each must count only its own processes (a worker empties its
        directory when it starts).
        """
        if self.metrics_dir is not None:
            return self.metrics_dir.resolve()
        return (self.data_dir / "metrics" / str(self.metrics_port)).resolve()

    def retry_policy(self, actor_name: str) -> RetryPolicy:
        """The retry policy of one actor: its own settings, else the global ones."""

        def pick(name: str, default: int) -> int:
            value = getattr(self, f"{actor_name}_{name}", None) if actor_name in RETRYING_ACTORS else None
            return default if value is None else int(value)

        return RetryPolicy(
            max_retries=pick("max_retries", self.max_retries),
            min_backoff_ms=pick("min_backoff_ms", self.min_backoff_ms),
            max_backoff_ms=pick("max_backoff_ms", self.max_backoff_ms),
        )

    def reminder_policy(self) -> ReminderPolicy:
        """When reminders go out, from these settings."""
        return ReminderPolicy(
            delays=tuple(timedelta(days=days) for days in self.reminder_delays_days),
            days=parse_days(self.reminder_window_days),
            opens=self.reminder_window_start,
            closes=self.reminder_window_end,
            timezone=ZoneInfo(self.reminder_timezone),
        )

    def access_code_policy(self) -> AccessCodePolicy:
        """What issuing a temporary password needs, from these settings."""
        return AccessCodePolicy(
            secret_key=self.secret_key_bytes(),
            hash_parameters=self.hash_parameters(),
            ttl=timedelta(days=self.access_code_ttl_days),
        )

    def hash_parameters(self) -> HashParameters:
        """argon2id's costs and the hashes allowed at once (no secret key read or generated)."""
        return HashParameters(
            memory_kib=self.argon2_memory_kib,
            time_cost=self.argon2_time_cost,
            parallelism=self.argon2_parallelism,
            concurrency=self.argon2_max_concurrent,
        )

    def secret_key_bytes(self) -> bytes:
        """SECRET_KEY, or the key generated once into ``data_dir``."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        from models.errors import ConfigurationError

        try:
            return _load_or_create_secret_key(self.data_dir.resolve())
        except ValueError as error:
            raise ConfigurationError(str(error)) from None
        except OSError as error:
            raise ConfigurationError(
                f"no SECRET_KEY, and DATA_DIR cannot hold a generated one ({error.strerror}): "
                "set SECRET_KEY, or DATA_DIR to a writable directory"
            ) from None

    def secret_key_problem(self) -> str | None:
        """Why the secret key cannot be used, or None; reads only (never generates the key file)."""
        if self.secret_key is not None:
            return None  # checked when the settings were read
        path = self.data_dir.resolve() / SECRET_KEY_FILE
        try:
            _key_of_file(path, path.read_text())
        except FileNotFoundError:
            return None  # generated on first use
        except OSError as error:
            return f"the secret key file {path} cannot be read ({error.strerror})"
        except ValueError as error:
            return str(error)
        return None


def broker_nodes(url: str) -> list[str]:
    """The URL of each node a ``BROKER_URL`` names: RabbitMQ nodes are separated by ``;``
    (as Dramatiq splits them); any other URL is its only node."""
    return [node.strip() for node in url.split(";") if node.strip()]


def configuration_problems(error: ValidationError) -> list[str]:
    """One line per problem of the settings: ``VARIABLE: what is wrong``, never the value read.

    A check of several variables together names them in its text, with no prefix.
    """
    problems = []
    for problem in error.errors(include_input=False, include_url=False):
        # pydantic prefixes the errors our own validators raise with "Value error, ".
        text = str(problem["msg"]).removeprefix("Value error, ")
        variable = ".".join(str(part) for part in problem["loc"]).upper()
        problems.append(f"{variable}: {text}" if variable else text)
    return problems


def parse_days(value: str) -> frozenset[int]:
    """``mon-fri``, ``mon,wed,fri`` or ``sat-sun`` as weekday numbers (0 = Monday)."""
    days: set[int] = set()
    for part in value.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in DAY_NAMES or (last and last not in DAY_NAMES):
            # The value is not quoted: a configuration error never prints what was read.
            raise ValueError("days must be day names or ranges of them, e.g. mon-fri or mon,wed,fri")
        start, end = DAY_NAMES.index(first), DAY_NAMES.index(last or first)
        days.update(range(start, end + 1) if start <= end else [*range(start, 7), *range(0, end + 1)])
    return frozenset(days)


@functools.cache
def _load_or_create_secret_key(data_dir: Path) -> bytes:
    path = data_dir / SECRET_KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: when two processes start at once, exactly one writes the key
        # and the other reads it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    for _ in range(100):
        content = path.read_text()
        if content.strip():
            return _key_of_file(path, content)
        # The other process created the file but has not written it yet.
        clock.sleep(0.01)
    return _key_of_file(path, "")


def _key_of_file(path: Path, content: str) -> bytes:
    """The key a secret key file holds; ValueError if it is empty or too short."""
    key = content.strip()
    if not key:
        # Left empty by a process stopped between creating and writing it: no key was
        # ever read from it, so removing it loses nothing.
        raise ValueError(f"the secret key file {path} is empty: remove it to have a new key generated")
    check_secret_key(key, name=f"the secret key file {path}")
    return key.encode()


def check_secret_key(key: str, *, name: str) -> None:
    """Refuse a key too short to keep the access codes secret (the message never quotes it)."""
    if len(key.strip()) < SECRET_KEY_MIN_LENGTH:
        raise ValueError(
            f"{name} must hold at least {SECRET_KEY_MIN_LENGTH} characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read once."""
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings


def reset_settings(settings: Settings | None = None) -> Settings:
    """Replace the process-wide settings (re-read from the environment when None)."""
    global _settings
    _settings = settings if settings is not None else Settings()
    return _settings
