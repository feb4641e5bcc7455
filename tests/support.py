"""Helpers shared by the tests: real servers, waiting with a deadline, sample messages."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import redis
from sqlalchemy import Engine, event

from models.status import ContractReport
from workers.embedded_redis import redis_server_binary
from workers.logs import JsonFormatter
from workers.middleware.message_log import LOGGER_NAME

T = TypeVar("T")

#: Default deadline for anything the tests wait on, in seconds.
DEFAULT_TIMEOUT = 20.0


def wait_until(
    condition: Callable[[], T], *, timeout: float = DEFAULT_TIMEOUT, what: str = "a condition"
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {value!r}")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A real redis-server of the tests' own, on 127.0.0.1, with append-only persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, timeout=15, what="the test Redis to start")
        client.close()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=15)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def unique(prefix: str = "t") -> str:
    """A short identifier no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def contract_payload(**overrides: Any) -> dict[str, Any]:
    """A valid send_contract payload with fresh ids; override any field."""
    suffix = uuid.uuid4().hex[:10]
    payload: dict[str, Any] = {
        "contract_id": f"c-{suffix}",
        "email": f"client-{suffix}@example.com",
        "company_name": f"Société {suffix} SARL",
        "lead_source": "network",
        "workspace_id": os.environ.get("TEST_WORKSPACE", "ws-main"),
        "signatories": [{"email": f"manager-{suffix}@example.com", "name": "Claire Manager"}],
        "sections": [
            {"id": "conditions", "title": "Conditions générales"},
            {"id": "tarifs", "title": "Tarifs"},
        ],
        "title": "Bureau privatif",
    }
    payload.update(overrides)
    return payload


def send_args(payload: dict[str, Any]) -> list[str]:
    """``send-contract`` flags for a ``contract_payload``."""
    args = [
        "send-contract",
        "--contract-id",
        payload["contract_id"],
        "--email",
        payload["email"],
        "--company",
        payload["company_name"],
        "--lead-source",
        payload["lead_source"],
        "--workspace",
        payload["workspace_id"],
    ]
    if payload.get("resource_group_id"):
        args += ["--resource-group", payload["resource_group_id"]]
    for signatory in payload["signatories"]:
        value = signatory["email"] + (f":{signatory['name']}" if signatory.get("name") else "")
        args += ["--signatory", value]
    for section in payload["sections"]:
        args += ["--section", section["id"] + (f":{section['title']}" if section.get("title") else "")]
    if payload.get("title"):
        args += ["--title", payload["title"]]
    if payload.get("locale"):
        args += ["--locale", payload["locale"]]
    return args


def record_resend(contract_id: str) -> int:
    """The invitation sent again, recorded and committed but never enqueued; its delivery id."""
    from models.access_codes import with_access_code
    from models.sending import resend_invitation
    from models.types import utc_now
    from workers.database import session_scope, transactions_lock_rows
    from workers.settings import get_settings

    settings = get_settings()
    now = utc_now()

    def record(code: Any) -> int:
        with session_scope() as session:
            return resend_invitation(
                session, contract_id, reminders=settings.reminder_policy(), now=now, access_code=code
            )

    return with_access_code(
        record, policy=settings.access_code_policy(), now=now, hash_in_transaction=transactions_lock_rows()
    )


def readme_message(actor: str, args: Any, *, queue: str = "contracts") -> dict[str, Any]:
    """A Dramatiq message, field for field as the README tells a producer in any language to write it."""
    message_id = str(uuid.uuid4())
    return {
        "queue_name": queue,
        "actor_name": actor,
        "args": args,
        "kwargs": {},
        "options": {"redis_message_id": message_id},
        "message_id": message_id,
        "message_timestamp": int(time.time() * 1000),
    }


def forget_namespace(client: redis.Redis, namespace: str) -> None:
    """Delete every key of a test's own Redis namespace."""
    keys = client.keys(f"{namespace}:*")
    if keys:
        client.delete(*keys)


def push_messages(client: redis.Redis, namespace: str, *messages: dict[str, Any]) -> None:
    """HSET + RPUSH of each message to its queue, all in one transaction (README)."""
    with client.pipeline(transaction=True) as pipe:
        for message in messages:
            queue, message_id = message["queue_name"], message["message_id"]
            pipe.hset(f"{namespace}:{queue}.msgs", message_id, json.dumps(message))
            pipe.rpush(f"{namespace}:{queue}", message_id)
        pipe.execute()


def enqueue_raw(
    client: redis.Redis, namespace: str, *, args: Any, actor: str = "send_contract", queue: str = "contracts"
) -> str:
    """Enqueue one message the way a producer without Python does; returns its id."""
    message = readme_message(actor, args, queue=queue)
    push_messages(client, namespace, message)
    return str(message["message_id"])


def wait_for_contract(
    contract_id: str,
    done: Callable[[ContractReport], bool],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "",
) -> ContractReport:
    """Wait until the contract's report satisfies ``done``; return that report."""
    from contract_dispatch import contract_status

    found: list[ContractReport] = []

    def check() -> bool:
        report = contract_status(contract_id)
        if report is not None and done(report):
            found.append(report)
            return True
        return False

    wait_until(check, timeout=timeout, what=what or f"contract {contract_id}")
    return found[0]


def all_emails_sent(count: int) -> Callable[[ContractReport], bool]:
    """``done`` for ``wait_for_contract``: exactly ``count`` emails, all sent."""
    return lambda report: len(report.emails) == count and all(e.status == "sent" for e in report.emails)


class CapturingHandler(logging.Handler):
    """Keeps every record of this process, formatted (JSON, with the message and any traceback)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self.processed: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if record.name == LOGGER_NAME:
            self.processed.append(dict(getattr(record, "fields", {})))


class Sent(NamedTuple):
    """One SQL statement as the engine sent it to the driver, with its parameters."""

    statement: str
    parameters: Any


@contextmanager
def recorded_statements(engine: Engine | None = None) -> Iterator[list[Sent]]:
    """The SQL statements ``engine`` (DATABASE_URL's by default) runs inside the block."""
    from workers.database import get_engine

    engine = engine if engine is not None else get_engine()
    seen: list[Sent] = []

    def record(_connection: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        seen.append(Sent(statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
