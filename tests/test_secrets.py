"""Secrets stay secret (issue 6, item 5): the SendGrid API key, SECRET_KEY and every access code.

The settings hold the two keys as ``SecretStr``: their repr, ``str``, dumps and
JSON show a mask. The SendGrid library's HTTP client logs the Authorization
header and the whole mail at DEBUG; its logger stays at INFO even when the root
logger is at DEBUG, and a filter drops its DEBUG records if something lowers it.

Then the whole flow runs at DEBUG (the journey of ``tests.test_logs``: invitations
to new accounts, so codes are issued; one the provider first answers 503; one it
refuses, which leaves a dead letter; a refused send, another dead letter; a
signature and its notification; a reminder a week later that renews an expired
code), once on the in-process worker with a handler at DEBUG on the root logger,
once on a real ``contract-dispatch worker`` subprocess with ``LOG_LEVEL=DEBUG``.
Afterwards every place the service writes is searched for the API key, the
SECRET_KEY and each access code the stand-in received in an email:

- every byte logged (records, worker stdout and stderr, CLI stderr);
- every key and value in Redis (read by type: strings, hashes, lists, sets,
  sorted sets, streams), key names included;
- every column of every row of every SQL table;
- what the CLI prints: ``contract-status --json``, ``dead-letters list/show``,
  ``status --json``, ``health --json``, ``verify-code``.

Each search first proves it looked at the real thing (the journey's contract ids
are where it searched), so an empty search cannot pass for a clean one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import MetaData, select

from tests.conftest import TEST_SECRET_KEY, database_of_its_own
from tests.processes import WorkerProcess, run_cli
from tests.sendgrid_standin import API_KEY, SendGridStandIn
from tests.support import CapturingHandler, unique, wait_until
from tests.test_access_codes import wait_settled
from tests.test_logs import (
    InProcess,
    Journey,
    Subprocess,
    count_mine,
    debug_worker_env,
    run_journey,
    secrets_sent,
)
from workers import settings as settings_module
from workers.cli import main
from workers.database import get_engine
from workers.dead_letters import MALFORMED_ACTOR
from workers.logs import SENDGRID_HTTP_LOGGER, silence_sendgrid_debug
from workers.middleware.message_log import LOGGER_NAME
from workers.settings import Settings, get_settings

#: A worker start never takes this long, in seconds.
WORKER_START_SECONDS = 60

#: What a secret's mask looks like in pydantic's output.
MASK = "**********"


# -- what must not be found, and where to look -------------------------------------------


def forbidden(codes: set[str]) -> dict[str, str]:
    """Each secret, by what it is."""
    assert codes, "the journey issued no access code: nothing to look for"
    return {
        "the SendGrid API key": API_KEY,
        "the SECRET_KEY": TEST_SECRET_KEY,
        **{f"access code {code}": code for code in sorted(codes)},
    }


def leaks(texts: dict[str, str], secrets: dict[str, str]) -> list[str]:
    """``where: what`` for every secret found in a text (texts keyed by where they come from)."""
    return [
        f"{what} in {where}: {text[max(0, text.find(value) - 80) : text.find(value) + 80]!r}"
        for where, text in texts.items()
        for what, value in secrets.items()
        if value in text
    ]


def redis_contents(client: redis.Redis, pattern: str) -> dict[str, str]:
    """Every key matching ``pattern`` and its value, read by type, as text."""
    found: dict[str, str] = {}
    for raw_key in client.scan_iter(match=pattern, count=1000):
        key = raw_key.decode("utf-8", "replace")
        kind = _text(client.type(raw_key))
        value: Any
        if kind == "string":
            value = client.get(raw_key)
        elif kind == "hash":
            value = client.hgetall(raw_key)
        elif kind == "list":
            value = client.lrange(raw_key, 0, -1)
        elif kind == "set":
            value = client.smembers(raw_key)
        elif kind == "zset":
            value = client.zrange(raw_key, 0, -1, withscores=True)
        elif kind == "stream":
            value = client.xrange(raw_key)
        else:
            value = client.dump(raw_key)
        found[f"redis {kind} {key}"] = key + " " + _text(value)
    return found


def _text(value: Any) -> str:
    """Bytes decoded (and JSON in them unescaped), containers flattened: what a reader would see."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
        with contextlib.suppress(ValueError):
            # A JSON body may escape non-ASCII; its decoded form is what it holds.
            text += " " + json.dumps(json.loads(text), ensure_ascii=False)
        return text
    if isinstance(value, dict):
        return " ".join(f"{_text(k)}={_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return " ".join(_text(item) for item in value)
    return str(value)


def sql_contents(url: str) -> dict[str, str]:
    """Every row of every table, each column as text, keyed by table and row number."""
    engine = get_engine(url)
    metadata = MetaData()
    metadata.reflect(bind=engine)
    found: dict[str, str] = {}
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            for number, row in enumerate(connection.execute(select(table))):
                found[f"sql {table.name} row {number}"] = " ".join(
                    f"{column}={_text(value)}" for column, value in row._mapping.items()
                )
    return found


def assert_searched(texts: dict[str, str], contract_ids: list[str], what: str) -> None:
    """The search saw the journey: each of ``contract_ids`` shows up somewhere in ``texts``."""
    joined = "\n".join(texts.values())
    missing = [contract_id for contract_id in contract_ids if contract_id not in joined]
    assert not missing, f"{what} never mentions {missing}: the search looked at the wrong place"


def in_redis(journey: Journey) -> list[str]:
    """What Redis must show of the journey: the refused send's payload, kept in the dead-letter queue."""
    return [journey.refused_by_actor]


# -- the settings and the SendGrid logger ---------------------------------------------------


def test_settings_hold_the_keys_as_secrets_and_never_show_them() -> None:
    settings = get_settings()
    assert isinstance(settings.sendgrid_api_key, SecretStr)
    assert isinstance(settings.secret_key, SecretStr)
    # The values are the real ones: the masks below hide something.
    assert settings.sendgrid_api_key.get_secret_value() == API_KEY
    assert settings.secret_key.get_secret_value() == TEST_SECRET_KEY
    shown = {
        "repr": repr(settings),
        "str": str(settings),
        "model_dump": repr(settings.model_dump()),
        "model_dump json": json.dumps(settings.model_dump(mode="json")),
        "model_dump_json": settings.model_dump_json(),
        "access code policy": repr(settings.access_code_policy()),
    }
    assert not leaks(shown, {"the SendGrid API key": API_KEY, "the SECRET_KEY": TEST_SECRET_KEY})
    assert MASK in shown["repr"] and MASK in shown["model_dump_json"]


def test_settings_errors_never_echo_a_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings that cannot be built: the error names the problem, never the values read.

    pydantic quotes a model's whole input in its errors (shortened in the
    middle): with few variables set, a short key would be printed whole. A key
    too short to be accepted is refused without being quoted either.
    """
    monkeypatch.chdir(tmp_path)  # no .env file
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for key, refused in (("s3cr3t-" * 5, "SEND_LEASE_SECONDS"), ("s3cr3t", "at least 32 characters")):
        key_secrets = {"the SECRET_KEY": key}
        monkeypatch.setenv("SECRET_KEY", key)
        # Longer than the default send lease: refused by a check of the whole model.
        monkeypatch.setenv("SENDGRID_TIMEOUT", "100")
        with pytest.raises(ValueError) as error:
            Settings()
        assert refused in str(error.value)
        assert not leaks({"str": str(error.value), "repr": repr(error.value)}, key_secrets)

    monkeypatch.setattr(settings_module, "_settings", None)  # read again, and fail
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["schema"])
    assert code == 3, (out.getvalue(), err.getvalue())
    assert "configuration error" in err.getvalue()
    assert not leaks({"stdout": out.getvalue(), "stderr": err.getvalue()}, key_secrets)


def test_sendgrid_debug_logging_is_silenced_even_with_the_root_logger_at_debug(
    root_at_debug: CapturingHandler,
) -> None:
    sendgrid = logging.getLogger(SENDGRID_HTTP_LOGGER)
    # Restored exactly afterwards: what this test sets must not protect the tests after it.
    saved = (sendgrid.level, list(sendgrid.filters))
    try:
        silence_sendgrid_debug()
        assert not sendgrid.isEnabledFor(logging.DEBUG)
        # Even when something lowers its level again, the filter still drops DEBUG.
        sendgrid.setLevel(logging.DEBUG)
        sendgrid.debug("Authorization: Bearer %s", API_KEY)
        sendgrid.info("a line that may pass")
    finally:
        sendgrid.setLevel(saved[0])
        sendgrid.filters[:] = saved[1]
    lines = root_at_debug.lines
    assert not any(API_KEY in line for line in lines), lines
    assert any("a line that may pass" in line for line in lines), "the capture saw nothing"


# -- the whole flow, in this process ----------------------------------------------------------


@pytest.fixture
def own_database(database: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database of the same kind as ``database``: the sweep and the scan see only this test's rows."""
    with database_of_its_own(database, tmp_path / "secrets.db") as url:
        yield url


def run_main(*argv: str) -> str:
    """``contract-dispatch ARGV`` in this process; what it printed on stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        main(list(argv))
    return out.getvalue() + err.getvalue()


def cli_outputs(run: Any, journey: Journey, emails: list[str], dead_letter_ids: list[int]) -> dict[str, str]:
    """What the operator commands print about the journey."""
    outputs: dict[str, str] = {}
    for contract_id in journey.contract_ids:
        outputs[f"contract-status {contract_id}"] = run("contract-status", contract_id, "--json")
        outputs[f"contract-status {contract_id} (text)"] = run("contract-status", contract_id)
    outputs["dead-letters list"] = run("dead-letters", "list", "--json", "--include-retried")
    for record_id in dead_letter_ids:
        outputs[f"dead-letters show {record_id}"] = run("dead-letters", "show", str(record_id), "--json")
    outputs["status"] = run("status", "--json")
    outputs["health"] = run("health", "--json", "--no-workers")
    for email in emails:
        # A code typed by the client is never echoed back (exit 0 or 1 alike).
        outputs[f"verify-code {email}"] = run("verify-code", "--email", email, "--code", "WRONG-CODE-0000")
    return outputs


def dead_letter_ids(url: str) -> list[int]:
    engine = get_engine(url)
    metadata = MetaData()
    metadata.reflect(bind=engine, only=["dead_letters"])
    table = metadata.tables["dead_letters"]
    with engine.connect() as connection:
        rows = connection.execute(select(table.c.id, table.c.actor_name)).all()
    return [row.id for row in rows if row.actor_name != MALFORMED_ACTOR]


def test_in_process_flow_at_debug_leaves_no_secret_anywhere(
    own_database: str,
    worker: Any,
    standin: SendGridStandIn,
    redis_server: Any,
    root_at_debug: CapturingHandler,
) -> None:
    journey = run_journey(InProcess(), standin)
    client = redis_server.client()
    wait_settled(client, *journey.contract_ids)
    wait_until(
        lambda: count_mine(root_at_debug.processed, journey) >= journey.line_count(),
        what="the journey's processed lines",
    )
    codes, _ = secrets_sent(list(standin.requests))
    secrets = forbidden(codes)
    emails = sorted({to for request in standin.requests for to in request.to})

    logged = {f"log line {n}": line for n, line in enumerate(root_at_debug.lines)}
    assert any('"level": "DEBUG"' in line for line in root_at_debug.lines), "DEBUG was not on"
    assert_searched(logged, journey.contract_ids, "the log")

    stored_redis = redis_contents(client, "*")
    stored_sql = sql_contents(own_database)
    assert_searched(stored_redis, in_redis(journey), "Redis")
    assert_searched(stored_sql, journey.contract_ids, "SQL")

    printed = cli_outputs(run_main, journey, emails, dead_letter_ids(own_database))
    assert_searched(printed, journey.contract_ids, "the CLI outputs")
    printed["settings repr"] = repr(get_settings())

    found = leaks({**logged, **stored_redis, **stored_sql, **printed}, secrets)
    assert not found, "\n".join(found[:20])
    # Codes are stored, as hashes only: the search met them.
    assert any("$argon2id$" in text for text in stored_sql.values())
    # The provider's answer quoting the refused invitation is kept, its password redacted.
    assert any(
        "content refused: Mot de passe temporaire : [redacted]" in text for text in stored_sql.values()
    )


# -- the whole flow, on a real worker process -------------------------------------------------


def test_worker_process_flow_at_debug_leaves_no_secret_anywhere(
    test_environment: dict[str, str],
    redis_server: Any,
    sqlite_database: str,
    private_standin: SendGridStandIn,
    tmp_path: Path,
) -> None:
    namespace = unique("secrets")
    env = debug_worker_env(
        test_environment,
        tmp_path,
        namespace=namespace,
        database_url=sqlite_database,
        standin=private_standin,
        log_format="text",
    )
    client = redis_server.client()
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log", processes=1, threads=2).start()
    driver = Subprocess(env, client, namespace)
    printed: dict[str, str] = {}

    def run(*argv: str) -> str:
        result = run_cli(env, *argv)
        return result.stdout + result.stderr

    try:
        journey = run_journey(driver, private_standin)

        def lines_in() -> bool:
            return f"contract_id={journey.refused_by_actor}" in worker.log() and all(
                contract_id in worker.log() for contract_id in journey.contract_ids
            )

        wait_until(lines_in, timeout=WORKER_START_SECONDS, what="the journey in the worker's log")
        emails = sorted({to for request in private_standin.requests for to in request.to})
        printed = cli_outputs(run, journey, emails, dead_letter_ids(sqlite_database))
        stored_redis = redis_contents(client, f"{namespace}:*")
    finally:
        if worker.alive():
            worker.terminate()
        client.delete(*(client.keys(f"{namespace}:*") or [f"{namespace}:none"]))
    log = worker.log()
    assert " DEBUG " in log, "the worker did not log at DEBUG"
    assert LOGGER_NAME in log
    codes, _ = secrets_sent(list(private_standin.requests))
    secrets = forbidden(codes)
    logged = {"worker log": log, "reminders run stderr": "\n".join(driver.command_logs)}
    stored_sql = sql_contents(sqlite_database)
    assert_searched(logged, journey.contract_ids, "the worker's log")
    assert_searched(stored_redis, in_redis(journey), "Redis")
    assert_searched(stored_sql, journey.contract_ids, "SQL")
    assert_searched(printed, journey.contract_ids, "the CLI outputs")
    found = leaks({**logged, **stored_redis, **stored_sql, **printed}, secrets)
    assert not found, "\n".join(found[:20])
