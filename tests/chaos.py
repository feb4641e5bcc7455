"""Chaos run: contracts through real workers while everything around them fails.

``python -m tests.chaos --contracts 1000`` (``make chaos``) sends N contracts
through the Python producer API to real ``contract-dispatch worker`` process
groups, while

- a SendGrid stand-in answers about 30 % of requests with 500, 503, 429 (with an
  ``X-RateLimit-Reset`` 1-2 s ahead) or a 202 that comes after the client's
  timeout (the provider accepted an email the client gave up on);
- worker groups are SIGKILLed at least 3 times (each replaced by a new one),
  some of them right after the stand-in accepted an email from one of their
  processes, before it could record the send;
- the Redis server (append-only) is stopped and started again on the same port;
- a handful of poisoned messages of several kinds are written raw to Redis.

It then waits until everything is final and the queues are empty, and reports:
contracts sent, invitations accepted, missing invitations (must be 0),
duplicates with the cause of each (must be explained), dead letters (must be
exactly the poisoned messages, each with its reason, or with its reason marked
lost when its worker was SIGKILLed right after the nack) and the time to drain.
The exit code is 0 only if every one of those holds.

Everything runs on servers of its own: a Redis server and a SendGrid stand-in
in a temporary directory, and a SQLite file there or a PostgreSQL schema
created for the run (and dropped after it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.processes import WorkerProcess
from tests.sendgrid_standin import API_KEY, Answer, Incoming, Received, SendGridStandIn
from tests.support import RedisServer, wait_until
from workers.email.delivery import MARK_SENT_PATIENCE_SECONDS

#: Where PostgreSQL runs are made (trust auth); the run adds a schema of its own.
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

#: The secret key of chaos runs (never a production value).
CHAOS_SECRET_KEY = "chaos-secret-key-" + "y" * 32

#: The Redis namespace of chaos runs.
NAMESPACE = "chaos"

#: The workspace every chaos contract is sent for.
WORKSPACE = "ws-chaos"

CAUSE_TIMED_OUT = "provider accepted after the client timed out"
CAUSE_KILLED = "SIGKILL between 202 and commit"
CAUSE_UNEXPLAINED = "unexplained"

#: How long a request may take to reach the stand-in after the client's timeout
#: started (its send, a loaded machine), in seconds: an answer ready that close to
#: the timeout may already be too late for the client.
REQUEST_TRANSIT_SECONDS = 0.1

#: The service's own settings: stripped from the environment the run inherits.
SERVICE_VARIABLES = frozenset(
    {
        "DATA_DIR",
        "REDIS_URL",
        "REDIS_NAMESPACE",
        "DATABASE_URL",
        "EMAIL_BACKEND",
        "SENDGRID_API_KEY",
        "SENDGRID_API_HOST",
        "SENDGRID_TIMEOUT",
        "MAIL_FROM",
        "MAIL_FROM_NAME",
        "APP_BASE_URL",
        "DISPLAY_TIMEZONE",
        "OUTBOX_DIR",
        "SECRET_KEY",
        "ACCESS_CODE_TTL_DAYS",
        "ARGON2_MEMORY_KIB",
        "ARGON2_TIME_COST",
        "ARGON2_PARALLELISM",
        "MAX_RETRIES",
        "MIN_BACKOFF_MS",
        "MAX_BACKOFF_MS",
        "SEND_LEASE_SECONDS",
        "HEARTBEAT_TIMEOUT_MS",
        "MAINTENANCE_INTERVAL_MS",
        "REDIS_OUTAGE_PATIENCE_SECONDS",
        "LOG_LEVEL",
        *(
            f"{actor}_{name}"
            for actor in ("SEND_CONTRACT", "NOTIFY_SIGNATORIES", "DELIVER_EMAIL")
            for name in ("MAX_RETRIES", "MIN_BACKOFF_MS", "MAX_BACKOFF_MS")
        ),
    }
)

#: Worker log lines worth counting in the report (substring -> label).
LOG_NOTES = {
    "is abandoned for": "broker id rotations",
    "Consumer encountered": "consumer crashes (restarted by Dramatiq)",
    "Failed to post_process_message": "acks/nacks retried through the Redis outage",
    "recording it failed, retrying": "commits of 'sent' retried",
    "Could not record dead message": "dead letters not recorded",
    "Could not mark delivery": "deliveries not marked failed",
    "Broker maintenance failed": "maintenance passes failed",
    "waits in Redis until it can be filed": "dead-letter reasons parked in Redis",
}


@dataclass
class ChaosOptions:
    """What one run does; the command line sets each of these."""

    contracts: int = 1000
    workers: int = 3
    processes: int = 1
    threads: int = 8
    kills: int = 4
    #: Of the kills, how many hit the process that just sent an accepted email.
    targeted_kills: int = 2
    seed: int | None = None
    #: "sqlite", "postgresql" or "auto" (PostgreSQL if reachable, else SQLite).
    database: str = "auto"
    fault_rate: float = 0.3
    sendgrid_timeout: float = 1.0
    slow_delay_min: float = 1.5
    slow_delay_max: float = 2.0
    redis_restart: bool = True
    redis_down_seconds: float = 2.0
    #: Seconds during which the stand-in answers every request with 503 (0: none).
    provider_outage: float = 0.0
    #: Contracts per second the producer sends (0: as fast as it can).
    send_rate: float = 25.0
    drain_timeout: float = 600.0
    max_retries: int | None = None
    min_backoff_ms: int = 100
    max_backoff_ms: int = 2000
    #: None: the service's default.
    heartbeat_timeout_ms: int | None = None
    maintenance_interval_ms: int | None = None
    send_lease_seconds: int | None = None
    keep: bool = False
    quiet: bool = False


@dataclass
class PoisonSpec:
    """A poisoned message to write: its payload, or envelope fields to spoil, or raw bytes."""

    kind: str
    actor: str
    expected: str
    args: Any
    queue: str = "contracts"
    envelope: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None


@dataclass
class Poison:
    """One deliberately poisoned message and the reason it must die with."""

    kind: str
    message_id: str
    queue: str
    expected: str
    written_at: float = 0.0


@dataclass
class KillEvent:
    #: When SIGKILL was sent, and when every process of the group was gone.
    at: float
    dead_at: float
    mode: str
    group: int
    pids: list[int]
    trigger: str = ""


@dataclass
class Group:
    """One worker process group (``contract-dispatch worker``)."""

    index: int
    process: WorkerProcess
    started_at: float
    pids: set[int] = field(default_factory=set)
    killed_at: float | None = None


def log(options: ChaosOptions, text: str) -> None:
    if not options.quiet:
        sys.stderr.write(f"[chaos {time.strftime('%H:%M:%S')}] {text}\n")
        sys.stderr.flush()


# -- who sent a request --------------------------------------------------------


def _socket_inode(client_port: int, server_port: int) -> str | None:
    """The inode of the client's end of a local TCP connection (from /proc/net/tcp)."""
    local = f":{client_port:04X} "
    remote = f":{server_port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            if local not in line or remote not in line:
                continue
            fields = line.split()
            # Established only: a port may also appear in a closed connection's leftover (inode 0).
            established = fields[3] == "01" and fields[9] != "0"
            if established and fields[1].endswith(local.strip()) and fields[2].endswith(remote.strip()):
                return fields[9]
    return None


def _holds_socket(pid: int, inode: str) -> bool:
    target = f"socket:[{inode}]"
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return False
    for entry in entries:
        with contextlib.suppress(OSError):
            if os.readlink(entry) == target:
                return True
    return False


def _wait_gone(pids: list[int], *, timeout: float = 10.0) -> None:
    """Until each process has exited (gone from /proc, or a zombie)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.005)


# -- the run ---------------------------------------------------------------------


class ChaosRun:
    def __init__(self, options: ChaosOptions) -> None:
        self.options = options
        self.seed = options.seed if options.seed is not None else random.SystemRandom().randrange(1, 10**9)
        self.rng = random.Random(self.seed)
        self.rng_lock = threading.Lock()
        self.run_id = uuid.uuid4().hex[:6]
        self.prefix = f"chaos-{self.run_id}-c"
        self.root = Path(tempfile.mkdtemp(prefix="contract-dispatch-chaos-"))
        self.lock = threading.RLock()
        self.groups: list[Group] = []
        self.kills: list[KillEvent] = []
        #: pid -> (SIGKILL sent, process gone), epoch seconds.
        self.killed_pids: dict[int, tuple[float, float]] = {}
        self.poisons: list[Poison] = []
        self.first_accepted: dict[str, float] = {}
        self.sent = 0
        self.send_started_at = 0.0
        self.last_send_at: float | None = None
        self.broker_unavailable = 0
        self.longest_failed_send = 0.0
        self.other_send_errors: Counter[str] = Counter()
        self.redis_restart: dict[str, Any] | None = None
        self.outage_until = 0.0
        self.outage: dict[str, Any] | None = None
        self.targeted_wanted = threading.Event()
        self.targeted_done = threading.Event()
        self.identify_failures: Counter[str] = Counter()
        self.stop = threading.Event()
        self.notes: list[str] = []
        self.redis_server: RedisServer | None = None
        self.standin: SendGridStandIn | None = None
        self.database_kind = ""
        self.database_url = ""
        self._drop_schema: Callable[[], None] | None = None
        self.environment: dict[str, str] = {}

    # -- random draws (stand-in threads and the controller share the generator) --

    def draw(self) -> float:
        with self.rng_lock:
            return self.rng.random()

    def uniform(self, low: float, high: float) -> float:
        with self.rng_lock:
            return self.rng.uniform(low, high)

    # -- set-up ------------------------------------------------------------------

    def open_database(self) -> None:
        choice = self.options.database
        if choice in ("auto", "postgresql"):
            try:
                self.database_url = self._create_schema()
                self.database_kind = "postgresql"
                return
            except Exception as exc:
                if choice == "postgresql":
                    raise SystemExit(f"PostgreSQL at {POSTGRES_URL} is unusable: {exc}") from None
                self.notes.append(f"PostgreSQL unreachable ({type(exc).__name__}); SQLite used")
        self.database_kind = "sqlite"
        self.database_url = f"sqlite:///{self.root / 'chaos.db'}"

    def _create_schema(self) -> str:
        from sqlalchemy import create_engine, text

        schema = f"cd_chaos_{self.run_id}"
        admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))

        def drop() -> None:
            with admin.connect() as connection:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()

        self._drop_schema = drop
        return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"

    def max_retries(self) -> int:
        if self.options.max_retries is not None:
            return self.options.max_retries
        # With jitter a saturated backoff waits at least half the longest delay:
        # enough retries to outlast the provider outage, and 30 more.
        outage_retries = math.ceil(2 * self.options.provider_outage * 1000 / self.options.max_backoff_ms)
        return 30 + outage_retries

    def service_environment(self) -> dict[str, str]:
        assert self.redis_server is not None and self.standin is not None
        options = self.options
        env = {
            "DATA_DIR": str(self.root / "data"),
            "REDIS_URL": self.redis_server.url,
            "REDIS_NAMESPACE": NAMESPACE,
            "DATABASE_URL": self.database_url,
            "EMAIL_BACKEND": "sendgrid",
            "SENDGRID_API_KEY": API_KEY,
            "SENDGRID_API_HOST": self.standin.url,
            "SENDGRID_TIMEOUT": str(options.sendgrid_timeout),
            "SECRET_KEY": CHAOS_SECRET_KEY,
            "APP_BASE_URL": "https://app.example.com",
            "MAIL_FROM": "contracts@example.com",
            "MAX_RETRIES": str(self.max_retries()),
            "MIN_BACKOFF_MS": str(options.min_backoff_ms),
            "MAX_BACKOFF_MS": str(options.max_backoff_ms),
        }
        if options.heartbeat_timeout_ms is not None:
            env["HEARTBEAT_TIMEOUT_MS"] = str(options.heartbeat_timeout_ms)
        if options.maintenance_interval_ms is not None:
            env["MAINTENANCE_INTERVAL_MS"] = str(options.maintenance_interval_ms)
        if options.send_lease_seconds is not None:
            env["SEND_LEASE_SECONDS"] = str(options.send_lease_seconds)
        return env

    def effective_settings(self) -> dict[str, Any]:
        from workers.settings import get_settings

        settings = get_settings()
        return {
            "database": self.database_kind,
            "SENDGRID_TIMEOUT": settings.sendgrid_timeout,
            "MAX_RETRIES": settings.max_retries,
            "MIN_BACKOFF_MS": settings.min_backoff_ms,
            "MAX_BACKOFF_MS": settings.max_backoff_ms,
            "SEND_LEASE_SECONDS": settings.send_lease_seconds,
            "HEARTBEAT_TIMEOUT_MS": settings.heartbeat_timeout_ms,
            "MAINTENANCE_INTERVAL_MS": settings.maintenance_interval_ms,
            "REDIS_OUTAGE_PATIENCE_SECONDS": settings.redis_outage_patience_seconds,
            "workers": f"{self.options.workers} x --processes {self.options.processes} "
            f"--threads {self.options.threads}",
            "fault_rate": self.options.fault_rate,
            "slow_delay_s": [self.options.slow_delay_min, self.options.slow_delay_max],
            "send_rate": self.options.send_rate or "unlimited",
        }

    # -- worker groups -------------------------------------------------------------

    def start_group(self) -> Group:
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
        env.update(self.environment)
        with self.lock:
            index = len(self.groups)
            process = WorkerProcess(
                env,
                log_path=self.root / "workers" / f"worker-{index}.log",
                processes=self.options.processes,
                threads=self.options.threads,
            ).start()
            group = Group(index=index, process=process, started_at=time.time())
            group.pids.add(process.pid)
            self.groups.append(group)
        return group

    def live_groups(self) -> list[Group]:
        with self.lock:
            return [g for g in self.groups if g.killed_at is None and g.process.alive()]

    def refresh_pids(self) -> None:
        for group in self.live_groups():
            children = group.process.children()
            with self.lock:
                group.pids.update(children)

    def group_of(self, pid: int) -> Group | None:
        with self.lock:
            for group in self.groups:
                if pid in group.pids:
                    return group
        return None

    def kill(self, group: Group, *, mode: str, trigger: str = "") -> None:
        with self.lock:
            if group.killed_at is not None:
                return
            group.pids.update(group.process.children())
            at = time.time()
            group.killed_at = at
            pids = sorted(group.pids)
        group.process.kill()
        _wait_gone(pids)
        dead_at = time.time()
        with self.lock:
            for pid in pids:
                self.killed_pids[pid] = (at, dead_at)
            self.kills.append(
                KillEvent(at=at, dead_at=dead_at, mode=mode, group=group.index, pids=pids, trigger=trigger)
            )

    def sender_pid(self, client_port: int) -> tuple[int | None, str]:
        """The worker process at the other end of a request's connection, and how it was found."""
        assert self.standin is not None
        server_port = int(self.standin.url.rsplit(":", 1)[1])
        inode = _socket_inode(client_port, server_port)
        if inode is None:
            return None, "no open connection"
        for attempt in range(2):
            with self.lock:
                # Killed groups too: a process being killed may still be answered.
                candidates = [pid for g in self.groups for pid in g.pids if pid not in self.killed_pids]
            for pid in candidates:
                if _holds_socket(pid, inode):
                    return pid, "found"
            if attempt == 0:
                self.refresh_pids()
        return None, "no worker holds it"

    # -- the stand-in's answers ----------------------------------------------------

    def choose(self, request: Incoming) -> Answer:
        pid, how = self.sender_pid(request.client_address[1])
        if pid is None:
            with self.lock:
                self.identify_failures[how] += 1
        note: dict[str, Any] = {"pid": pid, "sender": how}
        if time.time() < self.outage_until:
            return Answer(status=503, body=b'{"errors":[{"message":"outage"}]}', kind="outage", note=note)
        if self.draw() >= self.options.fault_rate:
            return Answer(kind="ok", note=note)
        fault = self.draw()
        if fault < 0.25:
            return Answer(status=500, body=b'{"errors":[{"message":"oops"}]}', kind="500", note=note)
        if fault < 0.5:
            return Answer(status=503, body=b'{"errors":[{"message":"busy"}]}', kind="503", note=note)
        if fault < 0.75:
            reset = int(time.time() + self.uniform(1.0, 2.0)) + 1
            return Answer(
                status=429,
                headers={"X-RateLimit-Reset": str(reset)},
                body=b'{"errors":[{"message":"too many requests"}]}',
                kind="429",
                note=note,
            )
        delay = self.uniform(self.options.slow_delay_min, self.options.slow_delay_max)
        return Answer(delay=delay, kind="slow", note=note)

    def answered(self, received: Received) -> None:
        if received.status != 202:
            return
        reference = received.reference or ""
        with self.lock:
            if reference not in self.first_accepted:
                self.first_accepted[reference] = received.answered_at
        answer = received.answer
        if answer is None or answer.kind != "ok" or not self.targeted_wanted.is_set():
            return
        pid = answer.note.get("pid")
        group = self.group_of(pid) if isinstance(pid, int) else None
        if group is None or group.killed_at is not None:
            return
        # Right after the 202 went out, before the sender can record it.
        self.targeted_wanted.clear()
        self.kill(group, mode="after a 202", trigger=f"{reference} (pid {pid})")
        self.targeted_done.set()

    # -- raw messages ----------------------------------------------------------------

    def write_raw(self, client: redis.Redis, spec: PoisonSpec) -> str:
        """HSET + RPUSH in one transaction, as a producer in any language would."""
        message_id = str(uuid.uuid4())
        body = spec.raw
        if body is None:
            envelope: dict[str, Any] = {
                "queue_name": spec.queue,
                "actor_name": spec.actor,
                "args": spec.args,
                "kwargs": {},
                "options": {"redis_message_id": message_id},
                "message_id": message_id,
                "message_timestamp": int(time.time() * 1000),
            }
            envelope.update(spec.envelope)
            body = json.dumps(envelope).encode()
        with client.pipeline(transaction=True) as pipe:
            pipe.hset(f"{NAMESPACE}:{spec.queue}.msgs", message_id, body)
            pipe.rpush(f"{NAMESPACE}:{spec.queue}", message_id)
            pipe.execute()
        return message_id

    def contract(self, index: int) -> dict[str, Any]:
        return {
            "contract_id": f"{self.prefix}{index:05d}",
            "email": f"client-{self.run_id}-{index}@example.com",
            "company_name": f"Société {self.run_id} n°{index} SARL",
            "lead_source": ("bap", "network", "other")[index % 3],
            "workspace_id": WORKSPACE,
            "signatories": [{"email": f"manager-{index % 7}@example.com", "name": "Claire Manager"}],
            "sections": [{"id": "conditions", "title": "Conditions générales"}, {"id": "tarifs"}],
            "title": f"Bureau {index}",
        }

    def poison_plan(self) -> list[PoisonSpec]:
        """The poisoned messages, one of each kind, and the reason each must die with."""
        anchor = self.contract(0)
        poison_id = f"chaos-{self.run_id}-p"
        signed = {"contract_id": f"{poison_id}-ghost", "legal_name": "Ghost SARL", "accepted_sections": ["x"]}
        other_workspace = dict(
            self.contract(1),
            contract_id=f"{poison_id}-ws",
            email=f"ws-{self.run_id}@example.com",
            workspace_id="ws-nowhere",
        )
        return [
            PoisonSpec(
                "invalid payload",
                "send_contract",
                "InvalidPayload",
                [{"contract_id": f"{poison_id}-payload", "colour": "red"}],
            ),
            PoisonSpec(
                "invalid email",
                "send_contract",
                "InvalidEmail",
                [dict(anchor, contract_id=f"{poison_id}-email", email="not-an-email")],
            ),
            PoisonSpec("non-object payload", "send_contract", "InvalidPayload", ["send me"]),
            PoisonSpec(
                "unknown actor", "no_such_actor", "ActorNotFound", [{"contract_id": f"{poison_id}-actor"}]
            ),
            PoisonSpec("unknown workspace", "send_contract", "UnknownWorkspace", [other_workspace]),
            PoisonSpec("wrong number of arguments", "send_contract", "TypeError", []),
            PoisonSpec("unknown contract signed", "notify_signatories", "UnknownContract", [signed]),
            PoisonSpec(
                "unknown delivery",
                "deliver_email",
                "UnknownDelivery",
                [{"delivery_id": 2_000_000_000}],
                queue="emails",
            ),
            # Written once the anchor contract is bound, to its address, in other letter case.
            PoisonSpec(
                "binding mismatch",
                "send_contract",
                "EmailBoundToOtherCompany",
                [
                    dict(
                        anchor,
                        contract_id=f"{poison_id}-binding",
                        company_name=anchor["company_name"].upper(),
                    )
                ],
            ),
            PoisonSpec("undecodable body", "send_contract", "DecodeError", [], raw=b"\x00{not json"),
            PoisonSpec(
                "foreign queue_name",
                "send_contract",
                "MalformedMessage",
                [dict(anchor, contract_id=f"{poison_id}-queue")],
                envelope={"queue_name": "nowhere"},
            ),
            PoisonSpec(
                "no redis_message_id",
                "send_contract",
                "MalformedMessage",
                [dict(anchor, contract_id=f"{poison_id}-noid")],
                envelope={"options": {}},
            ),
        ]

    # -- phases ------------------------------------------------------------------------

    def send_all(self) -> None:
        from contract_dispatch import BrokerUnavailable, send_contract

        rate = self.options.send_rate
        self.send_started_at = time.time()
        for index in range(self.options.contracts):
            if rate > 0:
                pause = self.send_started_at + index / rate - time.time()
                if pause > 0:
                    time.sleep(pause)
            payload = self.contract(index)
            while True:
                started = time.monotonic()
                try:
                    send_contract(**payload)
                    break
                except BrokerUnavailable:
                    with self.lock:
                        self.broker_unavailable += 1
                        self.longest_failed_send = max(self.longest_failed_send, time.monotonic() - started)
                except Exception as exc:
                    # e.g. a database briefly locked: the caller would retry too.
                    with self.lock:
                        self.other_send_errors[type(exc).__name__] += 1
                    if sum(self.other_send_errors.values()) > 100:
                        raise
                time.sleep(0.1)
            with self.lock:
                self.sent = index + 1
                self.last_send_at = time.time()

    def control(self, plan: list[tuple[str, float, Callable[[], bool]]]) -> None:
        """Run each event once its milestone is reached: ("sent"|"accepted", fraction, action).

        An action that returns False is not ready yet and is tried again.
        """
        total = self.options.contracts
        pending = sorted(plan, key=lambda item: item[1])
        last_refresh = 0.0
        while pending and not self.stop.is_set():
            if time.monotonic() - last_refresh > 1.0:
                self.refresh_pids()
                last_refresh = time.monotonic()
            with self.lock:
                progress = {"sent": self.sent / total, "accepted": len(self.accepted_contracts()) / total}
            for item in [item for item in pending if progress[item[0]] >= item[1]]:
                try:
                    done = item[2]()
                except Exception as exc:
                    self.notes.append(f"chaos event failed: {type(exc).__name__}: {exc}")
                    done = True
                if done:
                    pending.remove(item)
            time.sleep(0.05)

    def accepted_contracts(self) -> set[str]:
        return {ref for ref in self.first_accepted if ref.startswith(f"invitation:{self.prefix}")}

    def random_kill(self) -> bool:
        groups = self.live_groups()
        if not groups:
            return False
        with self.rng_lock:
            group = self.rng.choice(groups)
        self.kill(group, mode="random")
        log(self.options, f"SIGKILLed worker group {group.index} at random")
        self.start_group()
        return True

    def targeted_kill(self) -> bool:
        self.targeted_done.clear()
        self.targeted_wanted.set()
        if not self.targeted_done.wait(timeout=15):
            self.targeted_wanted.clear()
            if not self.targeted_done.is_set():
                self.notes.append(
                    "no email was accepted within 15 s to kill its sender: a random kill instead"
                )
                return self.random_kill()
        log(self.options, f"SIGKILLed worker group {self.kills[-1].group} right after it got a 202")
        self.start_group()
        return True

    def restart_redis(self) -> bool:
        assert self.redis_server is not None
        stopped = time.time()
        self.redis_server.stop()
        time.sleep(self.options.redis_down_seconds)
        self.redis_server.start()
        self.redis_restart = {"at": stopped, "down_seconds": round(time.time() - stopped, 2)}
        log(self.options, f"Redis restarted (down {self.redis_restart['down_seconds']} s)")
        return True

    def start_outage(self) -> bool:
        self.outage_until = time.time() + self.options.provider_outage
        self.outage = {"at": time.time(), "seconds": self.options.provider_outage}
        log(self.options, f"provider outage for {self.options.provider_outage} s")
        return True

    def write_poison(self, spec: PoisonSpec) -> bool:
        assert self.redis_server is not None
        # The binding mismatch needs the anchor contract bound first, or it would be the binding one.
        if (
            spec.kind == "binding mismatch"
            and self.contract_status(self.contract(0)["contract_id"]) != "sent"
        ):
            return False
        client = self.redis_server.client()
        try:
            message_id = self.write_raw(client, spec)
        except redis.ConnectionError:
            return False
        finally:
            client.close()
        with self.lock:
            self.poisons.append(
                Poison(
                    kind=spec.kind,
                    message_id=message_id,
                    queue=spec.queue,
                    expected=spec.expected,
                    written_at=time.time(),
                )
            )
        return True

    def contract_status(self, contract_id: str) -> str | None:
        from models.contract import Contract
        from workers.database import session_scope

        with session_scope() as session:
            contract = session.get(Contract, contract_id)
            return None if contract is None else str(contract.status)

    # -- waiting for the end ---------------------------------------------------------

    def sql_progress(self) -> tuple[int, int]:
        """(contracts sent, invitation deliveries sent) of this run."""
        from sqlalchemy import func
        from sqlmodel import col, select

        from models.contract import Contract
        from models.delivery import EmailDelivery
        from workers.database import session_scope

        with session_scope() as session:
            contracts = session.exec(
                select(func.count())
                .select_from(Contract)
                .where(col(Contract.id).startswith(self.prefix), Contract.status == "sent")
            ).one()
            deliveries = session.exec(
                select(func.count())
                .select_from(EmailDelivery)
                .where(col(EmailDelivery.contract_id).startswith(self.prefix), EmailDelivery.status == "sent")
            ).one()
        return int(contracts), int(deliveries)

    def dead_letter_count(self) -> int:
        from sqlalchemy import func
        from sqlmodel import select

        from models.dead_letter import DeadLetter
        from workers.database import session_scope

        with session_scope() as session:
            return int(session.exec(select(func.count()).select_from(DeadLetter)).one())

    def queues_empty(self, client: redis.Redis) -> bool:
        try:
            keys = [
                f"{NAMESPACE}:{queue}.msgs" for queue in ("contracts", "emails", "contracts.DQ", "emails.DQ")
            ]
            return all(client.hlen(key) == 0 for key in keys)
        except redis.ConnectionError:
            return False

    # -- the whole run ----------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        options = self.options
        started = time.time()
        self.standin = SendGridStandIn(chooser=self.choose, on_answer=self.answered).start()
        self.redis_server = RedisServer(self.root / "redis").start()
        self.open_database()
        self.environment = self.service_environment()
        for name in SERVICE_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(self.environment)
        from workers.settings import reset_settings

        reset_settings()
        from contract_dispatch import set_workspace

        set_workspace(WORKSPACE, ["rg-1"])
        settings = self.effective_settings()
        log(options, f"seed {self.seed}; settings {json.dumps(settings)}")
        log(options, f"run directory {self.root}")

        for _ in range(options.workers):
            self.start_group()
        client = self.redis_server.client()
        expected_processes = options.workers * options.processes
        wait_until(
            lambda: client.zcard(f"{NAMESPACE}:__heartbeats__") >= expected_processes,
            timeout=120,
            what="the workers to start",
        )
        self.refresh_pids()
        log(options, f"{options.workers} worker groups up; sending {options.contracts} contracts")

        plan: list[tuple[str, float, Callable[[], bool]]] = []
        kill_points = sorted(self.uniform(0.08, 0.85) for _ in range(options.kills))
        with self.rng_lock:
            targeted = set(self.rng.sample(range(options.kills), min(options.targeted_kills, options.kills)))
        for number, point in enumerate(kill_points):
            plan.append(("accepted", point, self.targeted_kill if number in targeted else self.random_kill))
        if options.redis_restart:
            plan.append(("sent", self.uniform(0.3, 0.6), self.restart_redis))
        if options.provider_outage > 0:
            plan.append(("accepted", self.uniform(0.2, 0.4), self.start_outage))
        for spec in self.poison_plan():
            plan.append(("sent", self.uniform(0.05, 0.9), functools.partial(self.write_poison, spec)))
        controller = threading.Thread(target=self.control, args=(plan,), name="chaos-controller", daemon=True)
        controller.start()

        self.send_all()
        assert self.last_send_at is not None
        log(
            options,
            f"all {options.contracts} contracts sent in "
            f"{self.last_send_at - self.send_started_at:.1f} s; draining",
        )

        deadline = time.monotonic() + options.drain_timeout
        all_final_at: float | None = None
        quiet_at: float | None = None
        timed_out = False
        last_log = 0.0
        while True:
            contracts_sent, deliveries_sent = self.sql_progress()
            final = contracts_sent == options.contracts and deliveries_sent == options.contracts
            if final and all_final_at is None:
                all_final_at = time.time()
                log(options, "every contract and invitation is final; waiting for the queues to empty")
            poisons_done = not controller.is_alive() and self.dead_letter_count() >= len(self.poisons)
            if final and poisons_done and self.queues_empty(client) and self.standin.in_flight == 0:
                quiet_at = time.time()
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            if time.monotonic() - last_log > 15:
                last_log = time.monotonic()
                log(
                    options,
                    f"contracts sent {contracts_sent}/{options.contracts}, "
                    f"invitations sent {deliveries_sent}, accepted {len(self.accepted_contracts())}",
                )
            time.sleep(0.25)
        self.stop.set()
        controller.join(timeout=30)

        result = self.report(
            settings=settings,
            started=started,
            all_final_at=all_final_at,
            quiet_at=quiet_at,
            timed_out=timed_out,
            client=client,
        )
        client.close()
        return result

    def shutdown(self, *, keep: bool, keep_schema: bool) -> None:
        for group in self.live_groups():
            with contextlib.suppress(Exception):
                group.process.terminate(timeout=30)
        if self.standin is not None:
            self.standin.stop()
        if self.redis_server is not None:
            self.redis_server.stop()
        from workers.database import dispose_engines

        dispose_engines()
        if self._drop_schema is not None and not keep_schema:
            with contextlib.suppress(Exception):
                self._drop_schema()
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- the report ---------------------------------------------------------------------

    def report(
        self,
        *,
        settings: dict[str, Any],
        started: float,
        all_final_at: float | None,
        quiet_at: float | None,
        timed_out: bool,
        client: redis.Redis,
    ) -> dict[str, Any]:
        from sqlmodel import col, select

        from models.contract import Contract
        from models.dead_letter import DeadLetter
        from models.delivery import EmailDelivery
        from workers.database import session_scope

        assert self.standin is not None and self.last_send_at is not None
        options = self.options
        failures: list[str] = []
        if timed_out:
            failures.append(f"not drained within {options.drain_timeout:.0f} s")

        with session_scope() as session:
            contracts = {
                c.id: c
                for c in session.exec(select(Contract).where(col(Contract.id).startswith(self.prefix)))
            }
            deliveries = list(
                session.exec(
                    select(EmailDelivery).where(col(EmailDelivery.contract_id).startswith(self.prefix))
                )
            )
            dead = list(session.exec(select(DeadLetter)))
        expected_ids = [self.contract(i)["contract_id"] for i in range(options.contracts)]
        not_sent = [cid for cid in expected_ids if cid not in contracts or contracts[cid].status != "sent"]
        by_contract: dict[str, list[EmailDelivery]] = defaultdict(list)
        for delivery in deliveries:
            by_contract[delivery.contract_id].append(delivery)
        deliveries_not_sent = [
            f"{d.idempotency_key} ({d.status}: {d.last_error})" for d in deliveries if d.status != "sent"
        ]
        wrong_count = [cid for cid in expected_ids if len(by_contract.get(cid, [])) != 1]
        if not_sent:
            failures.append(f"{len(not_sent)} contracts not 'sent' in SQL")
        if deliveries_not_sent or wrong_count:
            failures.append(
                f"{len(deliveries_not_sent)} invitations not 'sent', "
                f"{len(wrong_count)} contracts without exactly one"
            )

        # What the stand-in accepted, per delivery reference.
        requests = list(self.standin.requests)
        accepted: dict[str, list[Received]] = defaultdict(list)
        for received in requests:
            reference = received.reference or ""
            if received.status == 202 and reference.startswith(f"invitation:{self.prefix}"):
                accepted[reference].append(received)
        missing = [
            cid for cid in expected_ids if not any(ref.startswith(f"invitation:{cid}:") for ref in accepted)
        ]
        if missing:
            failures.append(f"{len(missing)} contracts whose invitation was never accepted")

        committed = {d.idempotency_key: d.provider_message_id for d in deliveries}
        duplicates: list[dict[str, Any]] = []
        causes: Counter[str] = Counter()
        for reference, items in sorted(accepted.items()):
            items.sort(key=lambda r: r.received_at)
            recorded = committed.get(reference)
            if recorded is not None and not any(r.message_id == recorded for r in items):
                failures.append(f"{reference}: SQL records a message id the provider never gave")
            if len(items) < 2:
                continue
            extra = [r for r in items if r.message_id != recorded]
            if len(extra) == len(items):
                extra = extra[1:]
            entry_causes = [self.cause_of(r) for r in extra]
            causes.update(entry_causes)
            duplicates.append(
                {
                    "reference": reference,
                    "copies": len(items),
                    "causes": entry_causes,
                    "answers": [
                        {
                            "kind": r.answer.kind if r.answer else "",
                            "pid": (r.answer.note.get("pid") if r.answer else None),
                            "sender": (r.answer.note.get("sender") if r.answer else None),
                            "received_at": round(r.received_at - started, 3),
                            "answered_at": round(r.answered_at - started, 3),
                            "client_closed": r.client_closed,
                            "recorded": r.message_id == recorded,
                        }
                        for r in items
                    ],
                }
            )
        unexplained = causes.get(CAUSE_UNEXPLAINED, 0)
        if unexplained:
            failures.append(f"{unexplained} unexplained duplicates")

        # Dead letters: exactly the poisoned messages, each with its reason.
        poisons = {p.message_id: p for p in self.poisons}
        dead_letters = []
        unexpected = []
        wrong_reason = []
        for record in dead:
            poison = poisons.get(record.message_id)
            entry = {
                "kind": poison.kind if poison else None,
                "message_id": record.message_id,
                "actor": record.actor_name,
                "queue": record.queue_name,
                "status": record.status,
                "reason": f"{record.exception_type}: {record.exception_message[:160]}",
                "attempts": record.attempts,
            }
            dead_letters.append(entry)
            if poison is None:
                unexpected.append(entry)
            elif record.exception_type != poison.expected:
                wrong_reason.append(entry)
        not_dead = [asdict(p) for p in self.poisons if p.message_id not in {r.message_id for r in dead}]
        if unexpected:
            failures.append(f"{len(unexpected)} unexpected dead letters")
        if wrong_reason:
            failures.append(f"{len(wrong_reason)} dead letters with the wrong reason")
        if not_dead:
            failures.append(f"{len(not_dead)} poisoned messages not dead-lettered in SQL")
        expected_plan = len(self.poison_plan())
        if len(self.poisons) != expected_plan:
            failures.append(f"only {len(self.poisons)} of {expected_plan} poisoned messages were written")
        try:
            in_redis = {
                (m.decode() if isinstance(m, bytes) else str(m))
                for queue in ("contracts", "emails")
                for m in client.zrange(f"{NAMESPACE}:{queue}.XQ", 0, -1)
            }
        except redis.RedisError as exc:
            in_redis = set()
            failures.append(f"Redis dead-letter queues unreadable: {exc}")
        if in_redis != set(poisons):
            failures.append(
                f"Redis dead-letter queues hold {len(in_redis)} messages, "
                f"{len(in_redis - set(poisons))} not poisoned, "
                f"{len(set(poisons) - in_redis)} poisoned ones absent"
            )
        if len(self.kills) < 3 and options.kills >= 3:
            failures.append(f"only {len(self.kills)} SIGKILLs happened")

        log_notes: Counter[str] = Counter()
        for path in sorted((self.root / "workers").glob("*.log")):
            text = path.read_text(errors="replace")
            for needle, label in LOG_NOTES.items():
                log_notes[label] += text.count(needle)

        first_accepts = [min(r.answered_at for r in items) for items in accepted.values()]
        last_accept = max(first_accepts) if first_accepts else None
        last_any_accept = max((r.answered_at for items in accepted.values() for r in items), default=None)

        last_send = self.last_send_at

        def since_last_send(moment: float | None) -> float | None:
            return None if moment is None else round(moment - last_send, 2)

        answer_kinds = Counter(r.answer.kind if r.answer else "" for r in requests)
        attempts = [d.attempts for d in deliveries]
        result: dict[str, Any] = {
            "ok": not failures,
            "failures": failures,
            "seed": self.seed,
            "database": self.database_kind,
            "settings": settings,
            "contracts_sent": self.sent,
            "invitations_accepted": len(accepted),
            "missing": len(missing),
            "missing_contracts": missing[:50],
            "duplicates": len(duplicates),
            "duplicate_emails": sum(d["copies"] - 1 for d in duplicates),
            "duplicate_causes": dict(causes),
            "unexplained_duplicates": unexplained,
            "duplicate_details": duplicates,
            "contracts_not_sent": not_sent[:50],
            "deliveries_not_sent": deliveries_not_sent[:50],
            "dead_letters": dead_letters,
            "unexpected_dead_letters": unexpected,
            "dead_letters_with_wrong_reason": wrong_reason,
            "poisoned_not_dead_lettered": not_dead,
            "poisoned": [asdict(p) for p in self.poisons],
            "kills": [asdict(k) for k in self.kills],
            "redis_restart": self.redis_restart,
            "provider_outage": self.outage,
            "producer_broker_unavailable": self.broker_unavailable,
            "producer_longest_failed_call_s": round(self.longest_failed_send, 2),
            "producer_other_errors": dict(self.other_send_errors),
            "provider_requests": len(requests),
            "provider_answers": dict(answer_kinds),
            "senders_unidentified": dict(self.identify_failures),
            "delivery_attempts": {
                "total": sum(attempts),
                "max": max(attempts, default=0),
                "mean": round(sum(attempts) / len(attempts), 2) if attempts else 0,
            },
            "broker_id_rotations": log_notes["broker id rotations"],
            "log_notes": {label: count for label, count in log_notes.items() if count},
            "notes": self.notes,
            "durations_s": {
                "send_phase": round(last_send - self.send_started_at, 2),
                "drain_to_last_invitation_accepted": since_last_send(last_accept),
                "drain_to_last_acceptance_of_any_copy": since_last_send(last_any_accept),
                "drain_to_all_deliveries_final": since_last_send(all_final_at),
                "drain_to_queues_empty": since_last_send(quiet_at),
                "total": round(time.time() - started, 2),
            },
            "run_directory": str(self.root),
        }
        return result

    def cause_of(self, received: Received) -> str:
        """Why the provider accepted this copy although the service never recorded it.

        The evidence: the answer's delay, whether the client had hung up by the
        time the answer was ready, which process sent the request and whether
        (and when) that process was SIGKILLed.
        """
        answer = received.answer
        timeout = self.options.sendgrid_timeout
        if answer is not None and answer.delay > timeout:
            return CAUSE_TIMED_OUT
        pid = answer.note.get("pid") if answer is not None else None
        kill = self.killed_pids.get(pid) if isinstance(pid, int) else None
        # The request may have waited up to one client timeout before the stand-in read it.
        in_flight_from = received.received_at - timeout - 1.0

        def died_in_flight(at: float, dead_at: float) -> bool:
            return at <= received.answered_at and dead_at >= in_flight_from

        if received.client_closed:
            # The client hung up before the answer: it timed out, or it was killed mid-send.
            if kill is not None and died_in_flight(*kill):
                return CAUSE_KILLED
            if pid is None and any(died_in_flight(*k) for k in self.kill_windows()):
                return CAUSE_KILLED
            return CAUSE_TIMED_OUT
        if received.answered_at - received.received_at > timeout - REQUEST_TRANSIT_SECONDS:
            # The stand-in itself was slower than the client's timeout (whose clock
            # started before the stand-in read the request).
            return CAUSE_TIMED_OUT
        # Killed after the 202 went out (before the process was gone), while its
        # commit could still be pending.
        if kill is not None:
            at, dead_at = kill
            if received.answered_at <= dead_at and at - received.answered_at <= MARK_SENT_PATIENCE_SECONDS:
                return CAUSE_KILLED
        # A process being killed cannot be looked into (its /proc entries go first):
        # an unidentified sender answered while a group was dying.
        if pid is None and any(
            at - 0.5 <= received.answered_at <= dead_at + 0.5 for at, dead_at in self.kill_windows()
        ):
            return CAUSE_KILLED
        return CAUSE_UNEXPLAINED

    def kill_windows(self) -> list[tuple[float, float]]:
        with self.lock:
            return [(kill.at, kill.dead_at) for kill in self.kills]


# -- printing ----------------------------------------------------------------------------


def summary_lines(result: dict[str, Any]) -> Iterator[str]:
    durations = result["durations_s"]
    yield (
        "chaos run "
        + ("PASSED" if result["ok"] else "FAILED")
        + f" (seed {result['seed']}, {result['database']})"
    )
    yield "settings: " + ", ".join(f"{k}={v}" for k, v in result["settings"].items())
    yield f"contracts sent:            {result['contracts_sent']}"
    yield f"invitations accepted:      {result['invitations_accepted']} (distinct delivery references)"
    yield f"missing:                   {result['missing']}"
    yield (
        f"duplicates:                {result['duplicates']} references accepted more than once "
        f"({result['duplicate_emails']} extra emails)"
    )
    for cause, count in sorted(result["duplicate_causes"].items()):
        yield f"  {count:4d}  {cause}"
    for entry in result["duplicate_details"]:
        if CAUSE_UNEXPLAINED in entry["causes"]:
            yield f"  unexplained: {entry['reference']} {entry['answers']}"
    yield f"dead letters:              {len(result['dead_letters'])} (poisoned: {len(result['poisoned'])})"
    for entry in result["dead_letters"]:
        kind = entry["kind"] or "NOT POISONED"
        yield f"  {kind}: {entry['actor']} on {entry['queue']} -> {entry['reason']}"
    for entry in result["poisoned_not_dead_lettered"]:
        yield f"  NOT DEAD-LETTERED: {entry['kind']} ({entry['message_id']})"
    kills = ", ".join(f"{k['mode']} (group {k['group']})" for k in result["kills"])
    yield f"SIGKILLs:                  {len(result['kills'])}: {kills}"
    restart = result["redis_restart"]
    yield "Redis restarted:           " + (f"once, down {restart['down_seconds']} s" if restart else "no")
    if result["provider_outage"]:
        yield f"provider outage:           {result['provider_outage']['seconds']} s of 503s"
    yield (
        f"producer:                  {result['producer_broker_unavailable']} BrokerUnavailable retried "
        f"(longest failing call {result['producer_longest_failed_call_s']} s)"
        + (f", other errors {result['producer_other_errors']}" if result["producer_other_errors"] else "")
    )
    yield f"provider requests:         {result['provider_requests']} {result['provider_answers']}"
    yield f"delivery attempts:         {result['delivery_attempts']}"
    if result["senders_unidentified"]:
        yield f"senders not identified:    {result['senders_unidentified']}"
    yield f"broker id rotations:       {result['broker_id_rotations']}"
    if result["log_notes"]:
        yield f"worker logs:               {result['log_notes']}"
    for note in result["notes"]:
        yield f"note: {note}"
    yield (
        f"durations (s):             send phase {durations['send_phase']}; from the last send: "
        f"last invitation accepted +{durations['drain_to_last_invitation_accepted']}, "
        f"all deliveries final +{durations['drain_to_all_deliveries_final']}, "
        f"queues empty +{durations['drain_to_queues_empty']}; total {durations['total']}"
    )
    for failure in result["failures"]:
        yield f"FAILURE: {failure}"


def run(options: ChaosOptions) -> dict[str, Any]:
    """One chaos run; returns the report (``ok`` says whether every rule held)."""
    chaos = ChaosRun(options)
    result: dict[str, Any] | None = None
    try:
        result = chaos.execute()
        return result
    finally:
        # A failed run keeps its directory (worker logs, SQLite); a PostgreSQL
        # schema only with --keep, so that failing runs leave nothing in a shared server.
        keep = options.keep or result is None or not result["ok"]
        chaos.shutdown(keep=keep, keep_schema=options.keep)
        if keep:
            kept = f"kept {chaos.root} (worker logs under workers/)"
            if chaos.database_kind == "postgresql" and options.keep:
                kept += f" and PostgreSQL schema cd_chaos_{chaos.run_id}"
            log(options, kept)


def parse_args(argv: list[str] | None) -> tuple[ChaosOptions, Path | None]:
    defaults = ChaosOptions()
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--contracts", type=int, default=defaults.contracts)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="worker process groups")
    parser.add_argument("--processes", type=int, default=defaults.processes, help="processes per group")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="threads per process")
    parser.add_argument("--kills", type=int, default=defaults.kills, help="SIGKILLs of a worker group")
    parser.add_argument(
        "--targeted-kills",
        type=int,
        default=defaults.targeted_kills,
        help="of the kills, how many hit the sender of an email the provider just accepted",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--database", choices=("auto", "sqlite", "postgresql"), default=defaults.database)
    parser.add_argument("--fault-rate", type=float, default=defaults.fault_rate)
    parser.add_argument("--sendgrid-timeout", type=float, default=defaults.sendgrid_timeout)
    parser.add_argument("--no-redis-restart", dest="redis_restart", action="store_false")
    parser.add_argument("--redis-down-seconds", type=float, default=defaults.redis_down_seconds)
    parser.add_argument(
        "--provider-outage",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="every request answered 503 for this long",
    )
    parser.add_argument(
        "--send-rate", type=float, default=defaults.send_rate, help="contracts per second (0: unlimited)"
    )
    parser.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout)
    parser.add_argument("--max-retries", type=int, default=None)
    parser.add_argument("--min-backoff-ms", type=int, default=defaults.min_backoff_ms)
    parser.add_argument("--max-backoff-ms", type=int, default=defaults.max_backoff_ms)
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=None)
    parser.add_argument("--maintenance-interval-ms", type=int, default=None)
    parser.add_argument("--send-lease-seconds", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, Redis, SQLite)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in ChaosOptions.__dataclass_fields__ if hasattr(args, name)}
    return ChaosOptions(**values), args.json


def main(argv: list[str] | None = None) -> int:
    options, json_path = parse_args(argv)
    result = run(options)
    for line in summary_lines(result):
        sys.stdout.write(line + "\n")
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
