"""Temporary access codes (DESIGN §1.3 and §6), through the real broker, worker and stand-in.

The plaintext of a code is only ever learnt from the email the SendGrid stand-in
received: that is the one place it may exist outside a worker's memory.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import argon2
import dramatiq
import pytest
import redis
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError
from dramatiq.brokers.stub import StubBroker
from sqlalchemy import MetaData, create_engine, event
from sqlalchemy import select as sa_select
from sqlalchemy.engine import make_url
from sqlmodel import select

import actors
from contract_dispatch import notify_signatories, resend_invitation, send_contract
from models.access_codes import (
    ALPHABET,
    CODE_LENGTH,
    AccessCodePolicy,
    GatedHasher,
    HashParameters,
    current_access_code,
    derive_code,
    issue_access_code,
    needs_access_code,
    password_hasher,
)
from models.account import Account
from models.contract import Contract
from models.delivery import EmailDelivery
from models.types import utc_now
from tests.conftest import database_of_its_own
from tests.sendgrid_standin import Answer, Received, SendGridStandIn
from tests.support import all_emails_sent, contract_payload, wait_for_contract, wait_until
from tests.write_lock import run_with_argon2_held, take_write_lock
from workers.broker import build_broker
from workers.database import get_engine, normalize_database_url, session_scope
from workers.middleware import HashingThreads
from workers.settings import Settings, get_settings

# -- helpers ---------------------------------------------------------------------

_PASSWORD_LINE = re.compile(
    r"^\s*(?:Mot de passe temporaire :|Temporary password:)\s*(\S+)\s*$", re.MULTILINE
)
_LOGIN_LINE = re.compile(r"^\s*(?:Identifiant :|Login:)\s*(\S+)\s*$", re.MULTILINE)


def code_in(email: Received) -> str | None:
    """The temporary password an invitation carries, read from its text part."""
    found = _PASSWORD_LINE.findall(email.content("text/plain"))
    assert len(found) <= 1, f"several passwords in one email: {found}"
    return found[0] if found else None


def requests_for(standin: SendGridStandIn, prefix: str) -> list[Received]:
    """Every request (whatever the answer) whose delivery reference starts with ``prefix``."""
    return [r for r in list(standin.requests) if (r.reference or "").startswith(prefix)]


def invitation(standin: SendGridStandIn, contract_id: str) -> Received:
    (accepted,) = standin.accepted_for(f"invitation:{contract_id}:")
    return accepted


def account_for(email: str) -> Account:
    with session_scope() as session:
        return session.exec(select(Account).where(Account.email == email)).one()


def deliveries_of(contract_id: str) -> list[EmailDelivery]:
    with session_scope() as session:
        return list(session.exec(select(EmailDelivery).where(EmailDelivery.contract_id == contract_id)).all())


def _in_flight(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """Messages of ``queue`` not yet acked or dead-lettered (ready, reserved or delayed)."""
    namespace = get_settings().redis_namespace
    messages: list[dict[str, Any]] = []
    for key in (f"{namespace}:{queue}.msgs", f"{namespace}:{queue}.DQ.msgs"):
        messages.extend(json.loads(raw) for raw in client.hvals(key))
    return messages


def _first_arg(message: dict[str, Any]) -> dict[str, Any]:
    args = message.get("args") or [{}]
    return args[0] if isinstance(args[0], dict) else {}


def settled(client: redis.Redis, contract_id: str) -> bool:
    """No message about this contract or its emails is still to be processed.

    Read in this order because an actor commits its deliveries and enqueues their
    messages before its own message is acked.
    """
    if any(_first_arg(m).get("contract_id") == contract_id for m in _in_flight(client, "contracts")):
        return False
    delivery_ids = {d.id for d in deliveries_of(contract_id)}
    return not any(_first_arg(m).get("delivery_id") in delivery_ids for m in _in_flight(client, "emails"))


def wait_settled(client: redis.Redis, *contract_ids: str) -> None:
    wait_until(
        lambda: all(settled(client, contract_id) for contract_id in contract_ids),
        what=f"every message of {', '.join(contract_ids)} to be processed",
    )


# -- through the worker -------------------------------------------------------


def test_new_account_gets_login_and_temporary_password(worker, standin, redis_server):
    payload = contract_payload()
    before = utc_now()
    send_contract(**payload)
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation")
    after = utc_now()

    email = invitation(standin, payload["contract_id"])
    text = email.content("text/plain")
    html = email.content("text/html")
    code = code_in(email)
    assert code is not None, text
    assert len(code) >= 10
    assert set(code) <= set(ALPHABET)
    assert _LOGIN_LINE.findall(text) == [payload["email"]]
    assert "Vous devrez le changer lors de votre première connexion." in text
    assert code in html
    assert payload["email"] in html
    assert "Vous devrez le changer lors de votre première connexion." in html

    account = account_for(payload["email"])
    assert account.first_login_at is None
    stored = account.access_code_hash
    assert stored is not None
    assert stored.startswith("$argon2id$")
    assert "$m=19456,t=2," in stored
    assert argon2.PasswordHasher().verify(stored, code)
    # The row keeps the hash and the nonce, never the code itself.
    for column, value in account.model_dump().items():
        assert code not in str(value), f"accounts.{column} holds the plaintext code"
    assert account.access_code_issued_at is not None
    assert account.access_code_expires_at is not None
    assert before - timedelta(seconds=1) <= account.access_code_issued_at <= after
    assert account.access_code_expires_at - account.access_code_issued_at == timedelta(days=7)
    assert account.access_code_used_at is None
    assert account.access_code_failed_attempts == 0

    (delivery,) = deliveries_of(payload["contract_id"])
    assert delivery.includes_access_code is True
    wait_settled(redis_server.client(), payload["contract_id"])


def test_account_that_logged_in_gets_no_codes(worker, standin, redis_server):
    first = contract_payload()
    send_contract(**first)
    wait_for_contract(first["contract_id"], all_emails_sent(1), what="the first invitation")
    first_code = code_in(invitation(standin, first["contract_id"]))
    assert first_code is not None

    with session_scope() as session:
        account = session.exec(select(Account).where(Account.email == first["email"])).one()
        account.first_login_at = utc_now()
        session.add(account)
    hash_after_login = account_for(first["email"]).access_code_hash

    second = contract_payload(email=first["email"], company_name=first["company_name"])
    send_contract(**second)
    wait_for_contract(second["contract_id"], all_emails_sent(1), what="the second invitation")

    email = invitation(standin, second["contract_id"])
    text = email.content("text/plain")
    assert code_in(email) is None, text
    assert _LOGIN_LINE.findall(text) == []
    assert "première connexion" not in text
    assert first_code not in text
    assert first_code not in email.content("text/html")
    assert "Mot de passe temporaire" not in email.content("text/html")
    assert f"https://app.example.com/contracts/{second['contract_id']}" in text

    # Nothing was issued: the stored hash is the one from before the login.
    assert account_for(first["email"]).access_code_hash == hash_after_login
    (delivery,) = deliveries_of(second["contract_id"])
    assert delivery.includes_access_code is False
    with session_scope() as session:
        contract = session.get(Contract, second["contract_id"])
        assert contract is not None
        assert contract.access_code_issued is False
    wait_settled(redis_server.client(), first["contract_id"], second["contract_id"])


def test_account_that_never_logged_in_gets_a_new_code(worker, standin, redis_server):
    first = contract_payload()
    send_contract(**first)
    wait_for_contract(first["contract_id"], all_emails_sent(1), what="the first invitation")
    old_code = code_in(invitation(standin, first["contract_id"]))
    assert old_code is not None
    old_account = account_for(first["email"])
    assert old_account.access_code_hash is not None
    assert argon2.PasswordHasher().verify(old_account.access_code_hash, old_code)

    second = contract_payload(email=first["email"], company_name=first["company_name"])
    send_contract(**second)
    wait_for_contract(second["contract_id"], all_emails_sent(1), what="the second invitation")
    new_code = code_in(invitation(standin, second["contract_id"]))
    assert new_code is not None
    assert new_code != old_code

    account = account_for(first["email"])
    assert account.access_code_hash is not None
    assert account.access_code_hash != old_account.access_code_hash
    assert account.access_code_nonce != old_account.access_code_nonce
    assert argon2.PasswordHasher().verify(account.access_code_hash, new_code)
    with pytest.raises(VerifyMismatchError):
        argon2.PasswordHasher().verify(account.access_code_hash, old_code)
    assert account.access_code_issued_at is not None and old_account.access_code_issued_at is not None
    assert account.access_code_issued_at >= old_account.access_code_issued_at
    wait_settled(redis_server.client(), first["contract_id"], second["contract_id"])


def _client(first_contract: str) -> dict[str, Any]:
    """A contract for a client whose account is new, has never logged in, or has logged in."""
    client = contract_payload()
    email, company_name = client["email"], client["company_name"]
    if first_contract != "new account":
        actors.send_contract.fn(contract_payload(email=email, company_name=company_name))
        if first_contract == "logged in":
            with session_scope() as session:
                account = session.exec(select(Account).where(Account.email == email)).one()
                account.first_login_at = utc_now()
                session.add(account)
    return contract_payload(email=email, company_name=company_name)


def _assert_one_code_sent_and_stored(
    standin: SendGridStandIn, payload: dict[str, Any], calls: list[tuple[Any, ...]], first_contract: str
) -> None:
    """One code hashed, emailed and matching the stored hash; none for a client who logged in."""
    assert [len(plaintexts) for (plaintexts,) in calls] == ([] if first_contract == "logged in" else [1])
    code = code_in(invitation(standin, payload["contract_id"]))
    if first_contract == "logged in":
        assert code is None
    else:
        stored = account_for(payload["email"]).access_code_hash
        assert code is not None and stored is not None
        assert argon2.PasswordHasher().verify(stored, code)


@pytest.mark.parametrize("first_contract", ["new account", "never logged in", "logged in"])
def test_a_code_is_hashed_while_no_transaction_holds_the_write_lock(
    sqlite_database, standin, monkeypatch, first_contract
):
    """On SQLite a transaction holds the one write lock from its start: a hash inside
    one (tens of milliseconds) made every other worker's transaction wait."""
    payload = _client(first_contract)
    _, calls = run_with_argon2_held(
        monkeypatch,
        partial(take_write_lock, sqlite_database),
        lambda: actors.send_contract.fn(payload),
        method="hash_many",
    )
    _assert_one_code_sent_and_stored(standin, payload, calls, first_contract)


@pytest.mark.postgres
@pytest.mark.parametrize("first_contract", ["new account", "never logged in", "logged in"])
def test_on_postgresql_a_code_is_hashed_in_the_one_transaction_while_other_contracts_go_on(
    tmp_path, standin, monkeypatch, first_contract
):
    """PostgreSQL locks rows, not the database: the code is hashed inside the send's
    only transaction (no first one that meets the account, rolls back and runs again),
    and another client's contract is recorded and sent meanwhile."""
    with database_of_its_own("postgresql", tmp_path / "unused.db") as url:
        payload = _client(first_contract)
        other = _client("logged in")
        rollbacks: list[Any] = []
        engine = get_engine(url)

        def note_rollback(connection: Any) -> None:
            # An autocommit connection (the sent mark) "rolls back" nothing when closed.
            if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                rollbacks.append(connection)

        def other_meanwhile() -> None:
            actors.send_contract.fn(other)
            # Recorded and sent while the held send's transaction is still open: had it
            # waited for that one, the held contract would be committed by now.
            with session_scope() as session:
                assert session.get(Contract, payload["contract_id"]) is None, "the other send waited"

        event.listen(engine, "rollback", note_rollback)
        try:
            _, calls = run_with_argon2_held(
                monkeypatch, other_meanwhile, lambda: actors.send_contract.fn(payload), method="hash_many"
            )
        finally:
            event.remove(engine, "rollback", note_rollback)
        assert rollbacks == [], "a transaction was rolled back"
        _assert_one_code_sent_and_stored(standin, payload, calls, first_contract)
        if first_contract != "logged in":  # no hash to hold, so no other send meanwhile
            assert code_in(invitation(standin, other["contract_id"])) is None


def test_a_resend_hashes_its_new_code_while_no_transaction_holds_the_write_lock(
    sqlite_database, standin, monkeypatch
):
    payload = contract_payload()
    actors.send_contract.fn(payload)
    enqueued: list[int] = []
    # The module (``actors.deliver_email`` is also the actor's name in the package).
    monkeypatch.setattr(
        importlib.import_module("actors.deliver_email"), "enqueue_deliveries", enqueued.extend
    )
    receipt, calls = run_with_argon2_held(
        monkeypatch,
        partial(take_write_lock, sqlite_database),
        lambda: resend_invitation(payload["contract_id"]),
        method="hash_many",
    )
    assert len(calls) == 1, "the new code was never hashed"
    assert receipt.step == 1
    (delivery_id,) = enqueued
    with session_scope() as session:
        resent = session.get(EmailDelivery, delivery_id)
        assert resent is not None and resent.includes_access_code


def test_retried_delivery_resends_the_same_code(worker, standin, redis_server):
    payload = contract_payload()
    standin.script(Answer(status=500), Answer(status=202))
    send_contract(**payload)
    report = wait_for_contract(
        payload["contract_id"],
        lambda r: all_emails_sent(1)(r) and r.emails[0].attempts == 2,
        what="the invitation to be sent on its second attempt",
    )
    assert report.emails[0].attempts == 2

    failed, accepted = requests_for(standin, f"invitation:{payload['contract_id']}:")
    assert (failed.status, accepted.status) == (500, 202)
    code = code_in(failed)
    assert code is not None
    assert code_in(accepted) == code
    # The whole email is the same, not only the code.
    assert failed.body["content"] == accepted.body["content"]
    assert account_for(payload["email"]).access_code_hash is not None
    assert argon2.PasswordHasher().verify(account_for(payload["email"]).access_code_hash or "", code)
    wait_settled(redis_server.client(), payload["contract_id"])


# -- the plaintext never leaves the email -------------------------------------


class _LogText(logging.Handler):
    """Keeps every record's text: message, arguments, formatted line and traceback."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.texts: list[str] = []
        self.debug_records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.extend([str(record.msg), repr(record.args), self.format(record)])
        if record.levelno == logging.DEBUG:
            self.debug_records += 1


def _redis_dump(server_client: Any) -> list[str]:
    """Every key and every value of every Redis database, as text."""
    texts: list[str] = []
    databases = [int(name[2:]) for name in server_client.info("keyspace")]
    pool_kwargs = server_client.connection_pool.connection_kwargs
    for db in databases:
        client: Any = redis.Redis(host=pool_kwargs["host"], port=pool_kwargs["port"], db=db)
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            values: list[Any]
            if kind == "string":
                values = [client.get(key)]
            elif kind == "hash":
                values = [item for pair in client.hgetall(key).items() for item in pair]
            elif kind == "list":
                values = client.lrange(key, 0, -1)
            elif kind == "set":
                values = list(client.smembers(key))
            elif kind == "zset":
                values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                values = [repr(entry) for entry in client.xrange(key)]
            elif kind == "none":  # expired while scanning
                values = []
            else:
                raise AssertionError(f"unexpected Redis type {kind} for {key!r}")
            for item in [key, *values]:
                texts.append(item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item))
        client.close()
    return texts


def _redis_files(directory: Path) -> bytes:
    """The append-only file and anything else Redis wrote: it keeps values deleted since."""
    return b"".join(path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file())


def _database_dump(url: str) -> list[str]:
    """Every column of every row of every table, as text."""
    texts: list[str] = []
    engine = create_engine(normalize_database_url(url))
    try:
        with engine.connect() as connection:
            metadata = MetaData()
            metadata.reflect(bind=connection)
            assert {"accounts", "contracts", "email_deliveries"} <= set(metadata.tables)
            for table in metadata.sorted_tables:
                for row in connection.execute(sa_select(table)):
                    for value in row:
                        if isinstance(value, bytes | memoryview):
                            texts.append(bytes(value).decode("latin-1"))
                        elif isinstance(value, dict | list):
                            texts.append(json.dumps(value, ensure_ascii=False))
                        else:
                            texts.append(str(value))
    finally:
        engine.dispose()
    return texts


def _sqlite_files(url: str) -> bytes:
    database = make_url(url).database
    assert database
    paths = [database + suffix for suffix in ("", "-wal") if Path(database + suffix).exists()]
    # Read in another process: closing a descriptor of the database file in this
    # process would drop the POSIX locks of this process's SQLite connections,
    # and a later process would then delete the write-ahead log under them.
    return subprocess.run(["cat", *paths], check=True, capture_output=True).stdout


def test_plaintext_code_is_never_in_redis_logs_or_database(worker, standin, redis_server, database, caplog):
    caplog.set_level(logging.DEBUG)
    root = logging.getLogger()
    previous_level = root.level
    handler = _LogText()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        # A retried invitation, then one dead-lettered by a permanent refusal,
        # then a re-issued code and a signature: every path a code travels near.
        retried = contract_payload()
        standin.script(Answer(status=500))
        send_contract(**retried)
        wait_for_contract(retried["contract_id"], all_emails_sent(1), what="the retried invitation")

        refused = contract_payload()
        standin.script(Answer(status=400, body=b'{"errors":[{"message":"refused"}]}'))
        send_contract(**refused)
        wait_for_contract(
            refused["contract_id"],
            lambda r: [e.status for e in r.emails] == ["failed"],
            what="the refused invitation to fail",
        )

        reissued = contract_payload(email=retried["email"], company_name=retried["company_name"])
        send_contract(**reissued)
        wait_for_contract(reissued["contract_id"], all_emails_sent(1), what="the re-issued invitation")

        notify_signatories(
            contract_id=retried["contract_id"],
            legal_name=retried["company_name"],
            accepted_sections=["conditions", "tarifs"],
        )
        wait_for_contract(
            retried["contract_id"],
            lambda r: r.status == "signed" and all_emails_sent(2)(r),
            what="the signatory to be told",
        )
        contract_ids = [retried["contract_id"], refused["contract_id"], reissued["contract_id"]]
        client = redis_server.client()
        wait_settled(client, *contract_ids)
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)

    codes = set()
    for contract_id in contract_ids:
        for received in requests_for(standin, f"invitation:{contract_id}:"):
            code = code_in(received)
            assert code is not None
            codes.add(code)
    assert len(codes) == 3, codes  # one per issue; the retry resent its code

    # Redis, as it is now, including the dead letter.
    redis_texts = _redis_dump(client)
    refused_delivery = deliveries_of(refused["contract_id"])[0].id
    namespace = get_settings().redis_namespace
    dead = [json.loads(raw) for raw in client.hvals(f"{namespace}:emails.XQ.msgs")]
    assert any(_first_arg(m).get("delivery_id") == refused_delivery for m in dead), "no dead letter to scan"
    # And everything Redis was ever asked to store, deleted since or not.
    redis_history = _redis_files(redis_server.directory)
    assert retried["contract_id"].encode() in redis_history, "the append-only file was not read"

    log_texts = handler.texts
    assert handler.debug_records > 0, "DEBUG records were not captured"
    caplog_texts = [r.getMessage() for r in caplog.records] + [caplog.text]
    # The failure's type (its text is left out where the service's log filter runs).
    assert any("ProviderUnavailable" in t for t in log_texts), "the worker's failure logs were not captured"

    database_texts = _database_dump(database)
    assert any(retried["email"] in t for t in database_texts), "the database dump is empty"
    database_files = _sqlite_files(database) if database.startswith("sqlite") else b""

    for code in codes:
        assert not [t for t in redis_texts if code in t], "an access code is in Redis"
        assert code.encode() not in redis_history, "an access code was written to Redis"
        assert not [t for t in log_texts if code in t], "an access code is in a log record"
        assert not [t for t in caplog_texts if code in t], "an access code is in the captured log"
        assert not [t for t in database_texts if code in t], "an access code is in the database"
        assert code.encode() not in database_files, "an access code is in the SQLite files"


# -- unit: models.access_codes ------------------------------------------------

_CHEAP = HashParameters(memory_kib=1024, time_cost=1, parallelism=1)


def test_alphabet_has_no_ambiguous_symbols_and_codes_are_long_enough():
    assert len(set(ALPHABET)) == len(ALPHABET)
    assert not set(ALPHABET) & set("01OIL")
    assert CODE_LENGTH >= 10


def test_derive_code_is_deterministic_per_key_and_nonce():
    key = b"k" * 32
    code = derive_code(key, "nonce-1")
    assert derive_code(key, "nonce-1") == code
    assert len(code) == CODE_LENGTH
    assert set(code) <= set(ALPHABET)
    assert derive_code(key, "nonce-2") != code
    assert derive_code(b"j" * 32, "nonce-1") != code
    codes = {derive_code(key, f"nonce-{i}") for i in range(2000)}
    assert len(codes) == 2000


def test_derive_code_is_uniform_over_the_alphabet():
    # Fixed inputs: the outcome is deterministic, so the test cannot flake.
    counts = Counter("".join(derive_code(b"uniformity-key", f"n{i}") for i in range(10_000)))
    assert set(counts) == set(ALPHABET)
    total = sum(counts.values())
    expected = total / len(ALPHABET)
    chi_square = sum((counts[symbol] - expected) ** 2 / expected for symbol in ALPHABET)
    # Chi-square, 30 degrees of freedom, p = 0.001. A plain "byte % 31" (no
    # rejection) over-weights 8 symbols by 1/8 and scores far above this.
    assert chi_square < 59.70, counts


def test_issue_access_code_sets_fields_and_resets_attempts():
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    policy = AccessCodePolicy(secret_key=b"s" * 32, hash_parameters=_CHEAP, ttl=timedelta(days=7))
    account = Account(
        email="a@example.com",
        company_name="ACME",
        access_code_failed_attempts=4,
        access_code_used_at=now - timedelta(days=1),
    )
    assert needs_access_code(account)

    issue_access_code(account, policy=policy, now=now)
    assert account.access_code_nonce
    assert account.access_code_hash is not None
    assert account.access_code_hash.startswith("$argon2id$")
    assert "$m=1024,t=1,p=1$" in account.access_code_hash
    code = current_access_code(account, secret_key=policy.secret_key)
    assert code == derive_code(policy.secret_key, account.access_code_nonce)
    assert code not in account.access_code_hash
    assert argon2.PasswordHasher().verify(account.access_code_hash, code)
    assert account.access_code_issued_at == now
    assert account.access_code_expires_at == now + timedelta(days=7)
    assert account.access_code_used_at is None
    assert account.access_code_failed_attempts == 0

    old_hash, old_code = account.access_code_hash, code
    issue_access_code(account, policy=policy, now=now + timedelta(hours=1))
    new_code = current_access_code(account, secret_key=policy.secret_key)
    assert new_code != old_code
    assert account.access_code_hash != old_hash
    with pytest.raises(VerifyMismatchError):
        argon2.PasswordHasher().verify(account.access_code_hash, old_code)
    assert account.access_code_expires_at == now + timedelta(hours=1, days=7)


def test_only_an_account_that_never_logged_in_needs_codes():
    account = Account(email="b@example.com", company_name="ACME")
    assert needs_access_code(account)
    assert current_access_code(account, secret_key=b"s") is None
    account.first_login_at = utc_now()
    assert not needs_access_code(account)


def test_default_hash_parameters_are_the_owasp_minimum():
    parameters = get_settings().access_code_policy().hash_parameters
    assert parameters.memory_kib == 19 * 1024
    assert parameters.time_cost == 2
    assert get_settings().access_code_policy().ttl == timedelta(days=7)


# -- hashing concurrency -------------------------------------------------------


class _ProbeHasher(PasswordHasher):
    """A real argon2id hasher that records how many hashes ran at once, and on which threads."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.threads: set[int] = set()

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        with self.lock:
            self.threads.add(threading.get_ident())
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.02)  # widen the window in which two hashes would overlap
            return super().hash(password, salt=salt)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("slots", [1, 2])
def test_hashes_run_at_most_slots_at_once(slots):
    probe = _ProbeHasher()
    gated = GatedHasher(probe, slots=slots)
    threads = [threading.Thread(target=gated.hash, args=(f"code-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert probe.most == slots
    # Always the hasher's own threads, never the callers': each keeps one memory block.
    assert len(probe.threads) == slots
    assert not probe.threads & {thread.ident for thread in threads}


def test_the_service_broker_starts_the_hashing_threads_before_the_workers_own(tmp_path):
    # Costs no other test uses: password_hasher keeps one hasher per costs and process.
    settings = Settings(argon2_memory_kib=1032, argon2_time_cost=1, argon2_max_concurrent=2)
    settings = settings.model_copy(update={"secret_key": None, "data_dir": tmp_path})
    parameters = settings.hash_parameters()
    hashing = [m for m in build_broker(settings).middleware if isinstance(m, HashingThreads)]
    assert [m.parameters for m in hashing] == [parameters]
    # Building the broker (every command that enqueues or reads a queue) needs no secret key.
    assert list(tmp_path.iterdir()) == []
    seen: dict[str, list[threading.Thread]] = {}

    class Probe(dramatiq.Middleware):
        def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
            # Dramatiq starts its worker threads after this hook.
            seen["hashing"] = [thread for thread in password_hasher(parameters).threads if thread.is_alive()]

    worker = dramatiq.Worker(StubBroker(middleware=[*hashing, Probe()]), worker_threads=1)
    worker.start()
    worker.stop()
    assert len(seen["hashing"]) == 2
    assert all(thread.name.startswith("argon2") for thread in seen["hashing"])


def test_worker_processes_share_the_cores_for_hashing(monkeypatch):
    from workers.runner import tuning_environment

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert tuning_environment(Settings(), processes=2)["ARGON2_MAX_CONCURRENT"] == "2"
    assert tuning_environment(Settings(), processes=8)["ARGON2_MAX_CONCURRENT"] == "1"
    assert "ARGON2_MAX_CONCURRENT" not in tuning_environment(Settings(argon2_max_concurrent=3), processes=2)
    tuned = tuning_environment(Settings(worker_timeout_ms=250), processes=2)
    assert tuned["dramatiq_worker_timeout"] == "250"
    # The hashing threads keep their blocks (see GatedHasher): no forced unmapping.
    assert "MALLOC_MMAP_THRESHOLD_" not in tuned
    assert Settings(argon2_max_concurrent=3).hash_parameters().concurrency == 3
