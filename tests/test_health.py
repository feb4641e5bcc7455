"""``contract-dispatch health`` (issue 5, item 3), always through the real command.

Healthy when Redis answers, the database answers and is writable, the email
backend is configured and a worker heartbeats; otherwise exit 1 with the reason,
within a few seconds (a container health check must never hang), and never a
secret in what it prints.

Each test works in a Redis namespace of its own on the tests' Redis server, so
the workers other tests run are not counted here.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import TEST_SECRET_KEY, _postgres_schema_url
from tests.processes import CLI, WorkerProcess, run_cli
from tests.sendgrid_standin import API_KEY
from tests.support import RedisServer, free_port, unique, wait_until

#: A worker is dead once its heartbeat is this old, in the tests (the default is 20 s).
HEARTBEAT_TIMEOUT_MS = 1500
#: How often the test worker heartbeats, in milliseconds.
MAINTENANCE_INTERVAL_MS = 200
#: What the command is given with ``--timeout``, in seconds.
CHECK_TIMEOUT_SECONDS = 1.0
#: An unhealthy answer comes within this long of the command's start, in seconds, by
#: its own clock: the checks' bound (the timeout, at least libpq's 2 s, plus the
#: command's 1 s margin) and a little for the threads.
ANSWER_WITHIN_SECONDS = 3.5
#: The whole process, interpreter start-up included, ends within this long, in seconds:
#: a command that hangs would not. Start-up alone took up to 6 s on a saturated
#: 2-core machine (two test processes, their workers and PostgreSQL beside it), so
#: the wall clock cannot carry the few seconds' rule.
PROCESS_ENDS_WITHIN_SECONDS = 20.0
#: A worker starts and registers within this long, in seconds.
WORKER_START_SECONDS = 30.0

#: A password that must never be printed.
DATABASE_PASSWORD = "pw-never-printed-7c1e"

CHECK_NAMES = {"redis", "database", "email", "workers"}


@dataclass
class Answer:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def report(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.stdout)
        return value

    def check(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.report["checks"][name]
        return found

    def assert_no_secret(self) -> None:
        for secret in (API_KEY, TEST_SECRET_KEY, DATABASE_PASSWORD):
            assert secret not in self.stdout + self.stderr


def health(env: dict[str, str], *args: str) -> Answer:
    started = time.monotonic()
    result = run_cli(env, "health", "--timeout", str(CHECK_TIMEOUT_SECONDS), *args, timeout=30)
    answer = Answer(result.returncode, result.stdout, result.stderr, time.monotonic() - started)
    answer.assert_no_secret()
    return answer


def assert_answered_in_time(answer: Answer) -> None:
    """Every check within the command's bound by its own clock; the process ended, not hung."""
    slowest_ms = max(check["duration_ms"] for check in answer.report["checks"].values())
    assert slowest_ms < ANSWER_WITHIN_SECONDS * 1000, answer
    assert answer.seconds < PROCESS_ENDS_WITHIN_SECONDS, answer


def settings_env(test_environment: dict[str, str], database_url: str, data_dir: Path) -> dict[str, str]:
    """The tests' settings, in a Redis namespace of this test's own, with short heartbeats."""
    return {
        **os.environ,
        **test_environment,
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "REDIS_NAMESPACE": unique("health"),
        "HEARTBEAT_TIMEOUT_MS": str(HEARTBEAT_TIMEOUT_MS),
        "MAINTENANCE_INTERVAL_MS": str(MAINTENANCE_INTERVAL_MS),
        "METRICS_PORT": "0",
    }


def exits_with(code: int, env: dict[str, str], *args: str) -> Answer | None:
    """The answer if the command exited with ``code`` (for ``wait_until``)."""
    answer = health(env, *args)
    return answer if answer.code == code else None


@pytest.fixture
def worker_env(test_environment: dict[str, str], database: str, tmp_path: Path) -> dict[str, str]:
    """For a real worker: on SQLite and on PostgreSQL (the ``database`` fixture's)."""
    return settings_env(test_environment, database, tmp_path / "data")


@pytest.fixture
def env(test_environment: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """For the checks that fail: an existing, empty SQLite file of this test's own."""
    path = tmp_path / "health.db"
    sqlite3.connect(path).close()
    return settings_env(test_environment, f"sqlite:///{path}", tmp_path / "data")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: a hung server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def test_live_worker_is_healthy_until_killed(worker_env, tmp_path):
    env = worker_env
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log", processes=1, threads=1).start()
    try:
        answer = wait_until(
            lambda: exits_with(0, env, "--json"),
            timeout=WORKER_START_SECONDS,
            what="the worker to be seen alive",
        )
        assert answer is not None
        report = answer.report
        assert report["healthy"] is True
        assert set(report["checks"]) == CHECK_NAMES
        assert all(check["ok"] for check in report["checks"].values()), report
        assert "1 live worker" in answer.check("workers")["detail"]
        # A worker container checks its own host's workers; ours are on this host, in
        # this PID namespace, which the worker registers beside its host name.
        assert health(env, "--this-host").code == 0
        from workers.middleware.maintenance import pid_namespace, workers_key

        client = redis.Redis.from_url(env["REDIS_URL"])
        try:
            (registration,) = [
                json.loads(info) for info in client.hgetall(workers_key(env["REDIS_NAMESPACE"])).values()
            ]
        finally:
            client.close()
        assert registration["host"] == socket.gethostname()
        assert pid_namespace() is not None
        assert registration["pid_namespace"] == pid_namespace()
        # The text form: a verdict, then one line per check.
        text = health(env)
        assert text.code == 0 and text.stdout.splitlines()[0] == "healthy"
    finally:
        worker.kill()
    # Its registration stays behind: only its heartbeat's age tells it is gone.
    killed_at = time.monotonic()
    answer = wait_until(
        lambda: exits_with(1, env, "--json"),
        timeout=HEARTBEAT_TIMEOUT_MS / 1000 + 10,
        what="the killed worker to be seen dead",
    )
    assert answer is not None
    assert time.monotonic() - killed_at >= HEARTBEAT_TIMEOUT_MS / 1000 - 1.0
    workers = answer.check("workers")
    assert workers["ok"] is False
    assert "no live worker" in workers["detail"] and "1 registered" in workers["detail"], workers
    assert f"HEARTBEAT_TIMEOUT_MS={HEARTBEAT_TIMEOUT_MS}" in workers["detail"]
    others = {name: check["ok"] for name, check in answer.report["checks"].items() if name != "workers"}
    assert all(others.values()), answer.report


def test_no_worker_is_unhealthy(worker_env):
    env = worker_env
    answer = health(env, "--json")
    assert answer.code == 1
    assert answer.report["healthy"] is False
    assert answer.check("workers") | {"duration_ms": 0} == {
        "ok": False,
        "detail": f"no worker registered in Redis namespace {env['REDIS_NAMESPACE']!r}",
        "duration_ms": 0,
    }
    assert all(answer.check(name)["ok"] for name in ("redis", "database", "email")), answer.report
    # A host that runs no worker (a producer, the scheduler) skips that check.
    skipped = health(env, "--json", "--no-workers")
    assert skipped.code == 0 and set(skipped.report["checks"]) == CHECK_NAMES - {"workers"}


def test_worker_on_another_host_does_not_count_for_this_host(env, redis_server):
    from workers.middleware.maintenance import workers_key

    client = redis_server.client()
    namespace = env["REDIS_NAMESPACE"]
    worker_id = unique("elsewhere")
    client.hset(workers_key(namespace), worker_id, json.dumps({"pid": 1, "host": "another-host"}))
    client.zadd(f"{namespace}:__heartbeats__", {worker_id: time.time() * 1000})
    # This test is about the host, not the heartbeat's age: the module's short
    # timeout (for the killed-worker test) could expire while the command starts.
    env = {**env, "HEARTBEAT_TIMEOUT_MS": "60000"}
    try:
        assert health(env).code == 0
        answer = health(env, "--json", "--this-host")
        assert answer.code == 1
        assert answer.check("workers")["detail"] == f"no worker registered on host {socket.gethostname()}"
    finally:
        client.delete(workers_key(namespace), f"{namespace}:__heartbeats__")


@pytest.mark.parametrize(
    ("registered_namespace", "counted"),
    [
        ("pid:[1]", False),  # a neighbour container sharing the host's network (and host name)
        ("own", True),  # this container
        (None, True),  # an earlier version's registration: by host name alone
    ],
    ids=["another-pid-namespace", "this-pid-namespace", "no-pid-namespace"],
)
def test_this_host_is_this_host_name_in_this_pid_namespace(env, redis_server, registered_namespace, counted):
    from workers.middleware.maintenance import heartbeats_key, pid_namespace, workers_key

    own = pid_namespace()
    assert own is not None and own.startswith("pid:["), own
    client = redis_server.client()
    env = {**env, "REDIS_NAMESPACE": unique("pid-namespace"), "HEARTBEAT_TIMEOUT_MS": "60000"}
    namespace = env["REDIS_NAMESPACE"]
    info: dict[str, object] = {"pid": 1, "host": socket.gethostname()}
    if registered_namespace is not None:
        info["pid_namespace"] = own if registered_namespace == "own" else registered_namespace
    worker_id = unique("neighbour")
    client.hset(workers_key(namespace), worker_id, json.dumps(info))
    client.zadd(heartbeats_key(namespace), {worker_id: time.time() * 1000})
    try:
        assert health(env).code == 0
        answer = health(env, "--json", "--this-host")
        assert (answer.code == 0) == counted, answer.report
        if not counted:
            assert answer.check("workers")["detail"] == f"no worker registered on host {socket.gethostname()}"
    finally:
        client.delete(workers_key(namespace), heartbeats_key(namespace))


@pytest.mark.parametrize("how", ["nothing listening", "stopped server", "server that never answers"])
def test_redis_down_is_unhealthy_within_seconds(env, tmp_path, silent_port, how):
    if how == "nothing listening":
        port = free_port()
    elif how == "stopped server":
        server = RedisServer(tmp_path / "redis").start()
        port = server.port
        server.stop()
    else:
        port = silent_port
    env = {**env, "REDIS_URL": f"redis://:{DATABASE_PASSWORD}@127.0.0.1:{port}/0"}
    answer = health(env, "--json")
    assert answer.code == 1
    assert_answered_in_time(answer)
    redis_check = answer.check("redis")
    assert redis_check["ok"] is False
    assert redis_check["detail"].startswith(f"Redis at 127.0.0.1:{port}/0 does not answer"), redis_check
    # Nothing to count workers with, either; the database and email are fine.
    assert answer.check("workers")["ok"] is False
    assert answer.check("database")["ok"] and answer.check("email")["ok"]
    text = health(env)
    assert text.code == 1
    assert text.stdout.splitlines()[0] == "unhealthy: redis, workers"
    assert f"FAIL redis: Redis at 127.0.0.1:{port}/0 does not answer" in text.stdout


@pytest.mark.parametrize("how", ["closed port", "server that never answers"])
def test_postgresql_unreachable_is_unhealthy_within_seconds(env, silent_port, how):
    port = free_port() if how == "closed port" else silent_port
    url = f"postgresql://cd:{DATABASE_PASSWORD}@127.0.0.1:{port}/contracts"
    answer = health({**env, "DATABASE_URL": url}, "--json", "--no-workers")
    assert answer.code == 1
    assert_answered_in_time(answer)
    database = answer.check("database")
    assert database["ok"] is False
    assert database["detail"].startswith(f"postgresql at 127.0.0.1:{port}/contracts: "), database
    assert answer.check("redis")["ok"] and answer.check("email")["ok"]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A schema of this test's own (skipped without PostgreSQL, failed under CI)."""
    urls = _postgres_schema_url()
    yield next(urls)
    for _ in urls:  # drops the schema
        pass


def test_read_only_postgresql_is_unhealthy(env, postgres_url):
    # Every transaction read-only, as on a standby: SELECT 1 answers, writes would fail.
    # The fixture's URL ends with its libpq options: one more goes after them.
    assert "?options=-csearch_path%3D" in postgres_url and "&" not in postgres_url
    url = f"{postgres_url}%20-cdefault_transaction_read_only%3Don"
    answer = health({**env, "DATABASE_URL": url}, "--json", "--no-workers")
    assert answer.code == 1, answer.report
    assert answer.check("database")["detail"].endswith("is read-only (transaction_read_only = on)"), (
        answer.report
    )
    assert health({**env, "DATABASE_URL": postgres_url}, "--no-workers").code == 0


def test_sqlite_path_unusable_is_unhealthy(env, tmp_path):
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    missing = tmp_path / "missing.db"
    cases = {
        f"sqlite:///{not_a_directory / 'x.db'}": "does not exist",
        f"sqlite:///{missing}": "does not exist (the worker creates it when it starts)",
        f"sqlite:///{tmp_path}": "is not a regular file",
    }
    for url, reason in cases.items():
        answer = health({**env, "DATABASE_URL": url}, "--json", "--no-workers")
        assert answer.code == 1, url
        assert answer.check("database")["ok"] is False
        assert reason in answer.check("database")["detail"], answer.report
    # The check never creates the database it looks for.
    assert not missing.exists()


def test_sendgrid_without_api_key_is_unhealthy_and_names_the_setting(env):
    for key in ("", "   "):
        answer = health({**env, "SENDGRID_API_KEY": key}, "--json", "--no-workers")
        assert answer.code == 1
        assert answer.check("email") == {
            "ok": False,
            "detail": "EMAIL_BACKEND=sendgrid but SENDGRID_API_KEY is not set",
            "duration_ms": answer.check("email")["duration_ms"],
        }
        assert answer.check("redis")["ok"] and answer.check("database")["ok"]
    # A key that cannot go into an HTTP header: named, never printed.
    spaced = f"{API_KEY} extra"
    answer = health({**env, "SENDGRID_API_KEY": spaced}, "--no-workers")
    assert answer.code == 1
    assert "FAIL email: SENDGRID_API_KEY contains spaces or control characters" in answer.stdout
    assert "extra" not in answer.stdout
    # With the key set, the check passes and shows no part of it.
    answer = health(env, "--json", "--no-workers")
    assert answer.code == 0
    assert answer.check("email")["detail"].startswith("sendgrid: API key set, API host http://127.0.0.1:")
    assert API_KEY[:12] not in answer.stdout


def test_file_backend_needs_a_writable_outbox(env, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    answer = health({**env, "EMAIL_BACKEND": "file", "OUTBOX_DIR": str(blocker)}, "--json", "--no-workers")
    assert answer.code == 1
    assert answer.check("email")["detail"] == f"OUTBOX_DIR {blocker} is not a directory"
    outbox = tmp_path / "outbox"
    answer = health({**env, "EMAIL_BACKEND": "file", "OUTBOX_DIR": str(outbox)}, "--json", "--no-workers")
    assert answer.code == 0, answer.report
    # Nothing is left behind by the check.
    assert not outbox.exists()


def test_this_host_and_no_workers_together_are_a_usage_error(env):
    """Skipping the worker check leaves nothing for --this-host to narrow: one or the other."""
    answer = health(env, "--this-host", "--no-workers")
    assert answer.code == 2
    assert "--no-workers: not allowed with argument --this-host" in answer.stderr
    assert answer.stdout == ""


def test_unreadable_configuration_is_unhealthy_in_the_same_shape(env):
    answer = health({**env, "EMAIL_BACKEND": "carrier-pigeon", "SECRET_KEY": TEST_SECRET_KEY}, "--json")
    assert answer.code == 1
    assert answer.report["healthy"] is False
    check = answer.check("configuration")
    assert check["ok"] is False and check["detail"].startswith("EMAIL_BACKEND: "), check
    assert "carrier-pigeon" not in answer.stdout


@pytest.mark.parametrize(
    ("content", "problem"), [("", "is empty: remove it"), ("short", "at least 32 characters")]
)
def test_a_secret_key_file_left_empty_or_short_is_unhealthy_and_stops_the_worker(
    env, tmp_path, content, problem
):
    """Without SECRET_KEY, the key generated into DATA_DIR derives every access code: a file
    left empty or too short would fail each new client's email and first login, one by one."""
    without_key = {key: value for key, value in env.items() if key != "SECRET_KEY"}
    key_file = Path(env["DATA_DIR"]) / "secret_key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(content)
    answer = health(without_key, "--json", "--no-workers")
    assert answer.code == 1
    check = answer.check("configuration")
    assert check["ok"] is False and problem in check["detail"], check
    worker = subprocess.run(
        [CLI, "worker", "--processes", "1", "--threads", "1"],
        env=without_key,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert worker.returncode == 3, worker.stderr
    assert worker.stderr.startswith(f"unavailable: the secret key file {key_file.resolve()} "), worker.stderr
    assert problem in worker.stderr
    # Without a file, the key is generated on first use: health reads, and never writes it.
    key_file.unlink()
    assert health(without_key, "--no-workers").code == 0
    assert not key_file.exists()
