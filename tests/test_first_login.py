"""First login (issue 6, item 1): an emailed access code is checked, then spent on a password.

Each rule has a test that fails when the rule is broken. Time is injected (no
sleeping); the rules run on SQLite and PostgreSQL through the ``database`` fixture.
Most tests use cheap argon2id costs; those about the public API, timing and races
use the configured (OWASP minimum) ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import argon2
import pytest
from sqlalchemy import event
from sqlmodel import select

import contract_dispatch
from contract_dispatch import AccessCodeRefused, PasswordRefused, send_contract
from models.access_codes import (
    AccessCodePolicy,
    HashParameters,
    current_access_code,
    issue_access_code,
    needs_access_code,
)
from models.account import Account
from models.code_refusal import CodeRefusal, address_digest, record_refusal
from models.first_login import (
    FirstLoginPolicy,
    PasswordIsAccessCode,
    PasswordTooLong,
    PasswordTooShort,
    set_password,
    verify_code,
    verify_password,
)
from tests.processes import CLI, COMMAND_TIMEOUT_SECONDS, describe, run_cli
from tests.sendgrid_standin import SendGridStandIn
from tests.support import all_emails_sent, contract_payload, unique, wait_for_contract
from tests.test_access_codes import code_in, invitation
from tests.write_lock import run_with_argon2_held, take_write_lock
from workers.database import get_engine, session_scope
from workers.reminders import purge_code_refusals
from workers.settings import get_settings

_CHEAP = HashParameters(memory_kib=1024, time_cost=1, parallelism=1)
_STRONGER = HashParameters(memory_kib=2048, time_cost=2, parallelism=1)
_POLICY = FirstLoginPolicy(hash_parameters=_CHEAP)

#: When the codes of these tests are issued; they live 7 days.
ISSUED = datetime(2030, 3, 4, 10, 0, tzinfo=UTC)
SOON = ISSUED + timedelta(hours=1)

GOOD_PASSWORD = "correct horse battery staple"


# -- helpers ---------------------------------------------------------------------


def new_account(*, parameters: HashParameters = _CHEAP, now: datetime = ISSUED) -> tuple[str, str]:
    """A new account holding a fresh code; returns its email and the code's plaintext."""
    email = f"{unique('first')}@example.com"
    policy = AccessCodePolicy(
        secret_key=get_settings().secret_key_bytes(), hash_parameters=parameters, ttl=timedelta(days=7)
    )
    with session_scope() as session:
        account = Account(email=email, company_name="ACME SARL")
        issue_access_code(account, policy=policy, now=now)
        session.add(account)
    code = current_access_code(account, secret_key=get_settings().secret_key_bytes())
    assert code is not None
    return email, code


def reissue(email: str, *, now: datetime) -> str:
    """Issue a new code to ``email`` (as a new contract or a reminder would); return it."""
    policy = AccessCodePolicy(
        secret_key=get_settings().secret_key_bytes(), hash_parameters=_CHEAP, ttl=timedelta(days=7)
    )
    with session_scope() as session:
        account = session.exec(select(Account).where(Account.email == email)).one()
        issue_access_code(account, policy=policy, now=now)
        session.add(account)
    code = current_access_code(account, secret_key=get_settings().secret_key_bytes())
    assert code is not None
    return code


def stored(email: str) -> Account:
    with session_scope() as session:
        return session.exec(select(Account).where(Account.email == email)).one()


def check(email: str, code: str, *, now: datetime = SOON, policy: FirstLoginPolicy = _POLICY) -> bool:
    return verify_code(session_scope, email, code, policy=policy, now=now)


def spend(
    email: str,
    code: str,
    password: str = GOOD_PASSWORD,
    *,
    now: datetime = SOON,
    policy: FirstLoginPolicy = _POLICY,
) -> None:
    set_password(session_scope, email, code, password, policy=policy, now=now)


def wrong(code: str) -> str:
    """Another valid-looking code: the same with its first symbol changed."""
    return ("3" if code[0] != "3" else "4") + code[1:]


@pytest.fixture
def verify_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every argon2 verification made, as the hash it checked against."""
    calls: list[str] = []
    original = argon2.PasswordHasher.verify

    def spy(self: argon2.PasswordHasher, hash: str | bytes, password: str | bytes) -> bool:
        calls.append(hash if isinstance(hash, str) else hash.decode())
        return original(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", spy)
    yield calls


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every argon2 hash made (of a password or a code), as a 1 per call."""
    calls: list[int] = []
    original = argon2.PasswordHasher.hash

    def spy(self: argon2.PasswordHasher, password: str | bytes, *, salt: bytes | None = None) -> str:
        calls.append(1)
        return original(self, password, salt=salt)

    monkeypatch.setattr(argon2.PasswordHasher, "hash", spy)
    yield calls


@pytest.fixture
def statements(database: str) -> Iterator[list[str]]:
    """The first word of every SQL statement run (SELECT, UPDATE, INSERT...), in order."""
    engine = get_engine()
    seen: list[str] = []

    def record(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def parameters_of(encoded: str) -> str:
    """``$argon2id$v=19$m=…,t=…,p=…``: the part of a hash that reveals its costs."""
    return "$".join(encoded.split("$")[:4])


# -- a code works once, before its expiry, for its account ------------------------


def test_verify_checks_without_consuming_and_set_password_consumes_once(database: str) -> None:
    email, code = new_account()
    assert check(email, code)
    assert check(email, code), "verify_code must not use the code up"

    spend(email, code, now=SOON)
    account = stored(email)
    assert account.first_login_at == SOON
    assert account.access_code_used_at == SOON
    assert account.password_hash is not None and account.password_hash.startswith("$argon2id$")
    assert account.access_code_hash is None, "a spent code keeps no hash"
    assert not needs_access_code(account), "reminders would keep sending codes"
    assert verify_password(session_scope, email, GOOD_PASSWORD, policy=_POLICY)
    assert not verify_password(session_scope, email, code, policy=_POLICY)

    assert not check(email, code), "a spent code still verifies"
    with pytest.raises(AccessCodeRefused):
        spend(email, code, "another long password")
    assert verify_password(session_scope, email, GOOD_PASSWORD, policy=_POLICY), "the password was replaced"


def test_code_works_only_before_its_expiry(database: str) -> None:
    email, code = new_account(now=ISSUED)
    expiry = ISSUED + timedelta(days=7)
    assert check(email, code, now=expiry - timedelta(seconds=1))
    assert not check(email, code, now=expiry)
    assert not check(email, code, now=expiry + timedelta(days=30))
    with pytest.raises(AccessCodeRefused):
        spend(email, code, now=expiry + timedelta(seconds=1))
    assert stored(email).password_hash is None
    spend(email, code, now=expiry - timedelta(seconds=1))


def test_code_works_only_for_its_account(database: str) -> None:
    alice, alice_code = new_account()
    bob, _ = new_account()
    assert not check(bob, alice_code)
    with pytest.raises(AccessCodeRefused):
        spend(bob, alice_code)
    bob_account = stored(bob)
    assert bob_account.password_hash is None and bob_account.first_login_at is None
    assert bob_account.access_code_failed_attempts == 2, "another account's code is a wrong code"
    spend(alice, alice_code)


def test_code_is_accepted_as_typed_by_hand(database: str) -> None:
    email, code = new_account()
    assert check(email, f" {code[:4].lower()}-{code[4:8]} {code[8:]} ")


def test_a_new_code_replaces_the_previous_one(database: str) -> None:
    email, old = new_account()
    new = reissue(email, now=SOON)
    assert not check(email, old, now=SOON)
    assert check(email, new, now=SOON)


# -- the password ------------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    [
        "{code}",
        "{lower}",
        "{spaced}",
        "my password is {code}!",
        # Past the first 64 characters, as long as the password itself is allowed.
        "correct-horse-battery-staple-correct-horse-battery-staple-padding-{code}",
        "{pad}{spaced}",
    ],
)
def test_the_code_can_never_become_the_password(database: str, password: str) -> None:
    email, code = new_account()
    spaced = f"{code[:4]} {code[4:8]}-{code[8:]}".lower()
    with pytest.raises(PasswordIsAccessCode):
        spend(email, code, password.format(code=code, lower=code.lower(), spaced=spaced, pad="x" * 100))
    account = stored(email)
    assert account.password_hash is None and account.first_login_at is None
    assert account.access_code_failed_attempts == 0, "a refused password is not a wrong code"
    assert check(email, code), "a refused password must not spend the code"


def test_password_length_policy(database: str) -> None:
    email, code = new_account()
    policy = FirstLoginPolicy(hash_parameters=_CHEAP, password_min_length=12)
    with pytest.raises(PasswordTooShort):
        spend(email, code, "x" * 11, policy=policy)
    with pytest.raises(PasswordTooLong):
        spend(email, code, "x" * 129, policy=policy)
    with pytest.raises(PasswordRefused):
        spend(email, code, "", policy=policy)
    assert check(email, code)
    spend(email, code, "é" * 128, policy=policy)
    assert verify_password(session_scope, email, "é" * 128, policy=policy)

    other, other_code = new_account()
    spend(other, other_code, "y" * 12, policy=policy)


def test_password_is_normalised_before_hashing(database: str) -> None:
    email, code = new_account()
    composed = "Mot de passe très sûr"
    spend(email, code, composed)
    decomposed = "Mot de passe tre\u0300s su\u0302r"
    assert verify_password(session_scope, email, decomposed, policy=_POLICY)


# -- lock-out ------------------------------------------------------------------------


def test_five_failures_lock_the_code_even_for_the_right_code(database: str) -> None:
    email, code = new_account()
    for _ in range(4):
        assert not check(email, wrong(code))
    assert check(email, code), "four failures must not lock yet"

    with pytest.raises(AccessCodeRefused):
        spend(email, wrong(code))  # set_password's failures count too: the fifth
    assert stored(email).access_code_failed_attempts == 5
    assert not check(email, code), "the right code after five failures"
    with pytest.raises(AccessCodeRefused):
        spend(email, code)
    assert stored(email).password_hash is None


def test_a_new_code_unlocks(database: str) -> None:
    email, code = new_account()
    for _ in range(5):
        assert not check(email, wrong(code))
    assert not check(email, code)

    new = reissue(email, now=SOON)
    assert stored(email).access_code_failed_attempts == 0
    assert not check(email, code, now=SOON)
    assert check(email, new, now=SOON)
    spend(email, new, now=SOON)


def test_the_attempt_limit_is_a_setting(database: str) -> None:
    email, code = new_account()
    policy = FirstLoginPolicy(hash_parameters=_CHEAP, max_failed_attempts=2)
    assert not check(email, wrong(code), policy=policy)
    assert check(email, code, policy=policy)
    assert not check(email, wrong(code), policy=policy)
    assert not check(email, code, policy=policy)


# -- enumeration --------------------------------------------------------------------


def test_unknown_email_answers_like_a_wrong_code_and_costs_one_verification(
    database: str, verify_calls: list[str], hash_calls: list[int]
) -> None:
    email, code = new_account()
    real_hash = stored(email).access_code_hash
    assert real_hash is not None

    verify_calls.clear()
    assert not check(email, wrong(code))
    assert len(verify_calls) == 1

    for unknown in (f"{unique('nobody')}@example.com", "not an address", "x" * 400 + "@example.com"):
        verify_calls.clear()
        assert not check(unknown, code)
        assert len(verify_calls) == 1, "an unknown email must cost one argon2id verification"
        assert parameters_of(verify_calls[0]) == parameters_of(real_hash), "the dummy hash's costs differ"
        assert verify_calls[0] != real_hash

    # The first such call of a process (each verify-code command is one) costs no more:
    # the dummy hash is not computed, only verified against.
    from models.first_login import _dummy_hash

    _dummy_hash.cache_clear()
    verify_calls.clear()
    hash_calls.clear()
    assert not check(f"{unique('nobody')}@example.com", code)
    assert (len(verify_calls), len(hash_calls)) == (1, 0), (
        "the first unknown email cost more than one verification"
    )
    assert parameters_of(verify_calls[0]) == parameters_of(real_hash)
    assert len(verify_calls[0]) == len(real_hash), "the dummy hash's salt or digest length differs"

    with pytest.raises(AccessCodeRefused) as known:
        spend(email, wrong(code))
    verify_calls.clear()
    with pytest.raises(AccessCodeRefused) as unknown_email:
        spend(f"{unique('nobody')}@example.com", code)
    assert len(verify_calls) == 1
    assert unknown_email.value.as_dict() == known.value.as_dict()


def test_locked_expired_and_spent_codes_cost_one_verification_too(
    database: str, verify_calls: list[str]
) -> None:
    email, code = new_account()
    for _ in range(5):
        check(email, wrong(code))
    verify_calls.clear()
    assert not check(email, code)
    assert not check(email, code, now=ISSUED + timedelta(days=8))
    assert len(verify_calls) == 2

    spent, spent_code = new_account()
    spend(spent, spent_code)
    verify_calls.clear()
    assert not check(spent, spent_code)
    assert len(verify_calls) == 1


def test_a_locked_or_expired_code_costs_the_same_typed_right_or_wrong(
    database: str, verify_calls: list[str], hash_calls: list[int]
) -> None:
    """Refused either way; any extra work for the right code would tell it by timing."""
    email, code = new_account()
    for _ in range(5):
        check(email, wrong(code))
    stronger = FirstLoginPolicy(hash_parameters=_STRONGER)
    for attempt in (
        lambda guess: spend(email, guess),  # locked
        lambda guess: spend(email, guess, now=ISSUED + timedelta(days=8)),  # expired
        lambda guess: check(email, guess, policy=stronger),  # locked, costs risen: no rehash
    ):
        costs = []
        for guess in (code, wrong(code)):
            verify_calls.clear()
            hash_calls.clear()
            with contextlib.suppress(AccessCodeRefused):
                assert not attempt(guess)
            costs.append((len(verify_calls), len(hash_calls)))
        assert costs == [(1, 0), (1, 0)], costs


def test_timing_does_not_tell_whether_the_email_exists(database: str) -> None:
    # Loose on purpose: medians of interleaved runs at the configured costs. A
    # missing dummy verification makes the unknown email ~100 times faster.
    email, code = new_account(
        parameters=get_settings().access_code_policy().hash_parameters, now=datetime.now(UTC)
    )
    other = f"{unique('nobody')}@example.com"
    known: list[float] = []
    unknown: list[float] = []
    # Enough failures would lock the code, which changes nothing here but the counter.
    for _ in range(7):
        for target, samples in ((email, known), (other, unknown)):
            started = time.perf_counter()
            assert not contract_dispatch.verify_code(target, wrong(code))
            samples.append(time.perf_counter() - started)
    ratio = statistics.median(unknown) / statistics.median(known)
    assert 0.5 < ratio < 2.0, (known, unknown)


def test_every_refused_code_writes_one_row(database: str, statements: list[str]) -> None:
    """A refusal that only read would commit faster than one that counted: timing would tell."""
    usable, code = new_account()
    locked, locked_code = new_account()
    for _ in range(5):
        check(locked, wrong(locked_code))
    expired, expired_code = new_account()
    spent, spent_code = new_account()
    spend(spent, spent_code)
    unknown = f"{unique('nobody')}@example.com"
    attempts: dict[str, Callable[[], Any]] = {
        "usable code, wrong": lambda: check(usable, wrong(code)),
        "unknown address": lambda: check(unknown, code),
        "unknown address, set_password": lambda: spend(unknown, code),
        "locked code, right": lambda: check(locked, locked_code),
        "locked code, wrong, set_password": lambda: spend(locked, wrong(locked_code)),
        "expired code, right": lambda: check(expired, expired_code, now=ISSUED + timedelta(days=8)),
        "spent code, right": lambda: check(spent, spent_code),
    }
    shapes = {}
    for name, attempt in attempts.items():
        statements.clear()
        with contextlib.suppress(AccessCodeRefused):
            assert not attempt(), name
        # SQLite's engine opens its transactions by a statement; PostgreSQL's driver does.
        verbs = [verb for verb in statements if verb != "BEGIN"]
        shapes[name] = ["write" if verb in {"INSERT", "UPDATE", "DELETE"} else "read" for verb in verbs]
    assert all(shape == ["read", "read", "write"] for shape in shapes.values()), shapes

    # Counted where the lock-out reads it only for the usable code; the rest by address.
    assert stored(usable).access_code_failed_attempts == 1
    assert stored(locked).access_code_failed_attempts == 5
    assert stored(spent).access_code_failed_attempts == 0
    with session_scope() as session:
        counted = {
            row.address_digest: row.refusals
            for row in session.exec(select(CodeRefusal))
            if row.address_digest in {address_digest(email, key=b"") for email in (unknown, locked)}
        }
    assert counted == {address_digest(unknown, key=b""): 2, address_digest(locked, key=b""): 2}

    # The service keys the digest with SECRET_KEY: no table row is the address's plain hash.
    stranger = f"{unique('nobody')}@example.com"
    assert not contract_dispatch.verify_code(stranger, code)
    with session_scope() as session:
        keyed = session.get(CodeRefusal, address_digest(stranger, key=get_settings().secret_key_bytes()))
    assert keyed is not None and keyed.refusals == 1


def test_refusal_counts_are_kept_a_day(database: str) -> None:
    now = datetime(2030, 3, 4, 10, 0, tzinfo=UTC)
    old, recent = address_digest(unique("old"), key=b"k"), address_digest(unique("recent"), key=b"k")
    with session_scope() as session:
        record_refusal(session, old, now=now - timedelta(days=1, seconds=1))
        record_refusal(session, recent, now=now - timedelta(hours=23))
    assert purge_code_refusals(now=now) >= 1
    with session_scope() as session:
        left = {row.address_digest for row in session.exec(select(CodeRefusal))}
    assert recent in left and old not in left


# -- rehash ---------------------------------------------------------------------------


def test_a_code_hash_is_rehashed_on_a_successful_verify_when_costs_rise(database: str) -> None:
    email, code = new_account(parameters=_CHEAP)
    stronger = FirstLoginPolicy(hash_parameters=_STRONGER)
    cheap_hash = stored(email).access_code_hash
    assert cheap_hash is not None and "m=1024,t=1,p=1" in cheap_hash

    assert not check(email, wrong(code), policy=stronger)
    assert stored(email).access_code_hash == cheap_hash, "a failed verify must not rehash"

    assert check(email, code, policy=stronger)
    rehashed = stored(email).access_code_hash
    assert rehashed is not None and "m=2048,t=2,p=1" in rehashed
    assert check(email, code, policy=stronger)
    assert stored(email).access_code_hash == rehashed, "an up-to-date hash is left alone"


def test_a_password_hash_is_rehashed_on_use_when_costs_rise(database: str) -> None:
    email, code = new_account()
    spend(email, code, policy=_POLICY)
    cheap_hash = stored(email).password_hash
    assert cheap_hash is not None and "m=1024,t=1,p=1" in cheap_hash
    stronger = FirstLoginPolicy(hash_parameters=_STRONGER)

    assert not verify_password(session_scope, email, "not the password", policy=stronger)
    assert stored(email).password_hash == cheap_hash

    assert verify_password(session_scope, email, GOOD_PASSWORD, policy=stronger)
    rehashed = stored(email).password_hash
    assert rehashed is not None and "m=2048,t=2,p=1" in rehashed
    assert verify_password(session_scope, email, GOOD_PASSWORD, policy=stronger)


def test_the_configured_costs_are_used(database: str) -> None:
    email, code = new_account(now=datetime.now(UTC))
    contract_dispatch.set_password(email, code, GOOD_PASSWORD)
    password_hash = stored(email).password_hash
    assert password_hash is not None
    assert parameters_of(password_hash) == "$argon2id$v=19$m=19456,t=2,p=1"
    assert contract_dispatch.verify_password(email, GOOD_PASSWORD)


# -- races --------------------------------------------------------------------------


def _race(count: int, attempt: Callable[[int], Any]) -> list[Any]:
    """Run ``attempt(i)`` in ``count`` threads released together; their results or errors."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = attempt(index)
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_concurrent_set_password_with_the_right_code_succeeds_once(database: str) -> None:
    for _ in range(3):
        _race_set_password(threads=4)


def _race_set_password(*, threads: int) -> None:
    costs = get_settings().access_code_policy().hash_parameters
    email, code = new_account(parameters=costs, now=datetime.now(UTC))
    passwords = [f"password number {i} of the race" for i in range(threads)]
    results = _race(threads, lambda i: contract_dispatch.set_password(email, code, passwords[i]))
    winners = [i for i, result in enumerate(results) if result is None]
    assert len(winners) == 1, results
    losers = [result for i, result in enumerate(results) if i != winners[0]]
    assert all(isinstance(result, AccessCodeRefused) for result in losers), results
    assert contract_dispatch.verify_password(email, passwords[winners[0]])
    assert stored(email).access_code_failed_attempts == 0, "losing the race is not a wrong code"


def test_concurrent_failures_are_all_counted(database: str) -> None:
    email, code = new_account()
    policy = FirstLoginPolicy(hash_parameters=_CHEAP, max_failed_attempts=50)
    results = _race(8, lambda i: check(email, wrong(code), policy=policy))
    assert results == [False] * 8
    assert stored(email).access_code_failed_attempts == 8, "a failed attempt was lost"


# -- the command line, end to end ----------------------------------------------------


def test_cli_first_login_with_the_emailed_code(
    worker: Any, standin: SendGridStandIn, database: str, test_environment: dict[str, str]
) -> None:
    payload = contract_payload()
    send_contract(**payload)
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation")
    code = code_in(invitation(standin, payload["contract_id"]))
    assert code is not None
    email = payload["email"]
    env = {**test_environment, "DATABASE_URL": database}

    valid = run_cli(env, "verify-code", "--email", email, "--code", code)
    assert (valid.returncode, valid.stdout) == (0, "valid\n"), valid

    # --json on both: stdout and stderr must be the same, byte for byte.
    wrong_code = run_cli(env, "verify-code", "--email", email, "--code", wrong(code), "--json")
    unknown = run_cli(
        env, "verify-code", "--email", f"{unique('nobody')}@example.com", "--code", code, "--json"
    )
    assert wrong_code.returncode == unknown.returncode == 1, (wrong_code, unknown)
    assert (wrong_code.stdout, wrong_code.stderr) == (unknown.stdout, unknown.stderr), "it tells who exists"
    assert wrong_code.stderr.startswith("access_code_refused: ")
    assert json.loads(wrong_code.stdout) == {
        "valid": False,
        "error": {"code": "access_code_refused", "message": AccessCodeRefused().message},
    }

    short = run_cli(env, "set-password", "--email", email, "--code", code, stdin="short\n")
    assert short.returncode == 2 and short.stderr.startswith("password_too_short: "), short
    nothing = run_cli(env, "set-password", "--email", email, "--code", code)
    assert nothing.returncode == 2, nothing

    refused = run_cli(
        env, "set-password", "--email", email, "--code", wrong(code), stdin=GOOD_PASSWORD + "\n"
    )
    assert (refused.returncode, refused.stderr) == (1, wrong_code.stderr), refused

    done = run_cli(
        env, "set-password", "--email", email, "--code", code, "--json", stdin=GOOD_PASSWORD + "\n"
    )
    assert done.returncode == 0, done
    assert json.loads(done.stdout) == {"password_set": True, "error": None}
    assert GOOD_PASSWORD not in done.stdout + done.stderr, "the password was echoed"
    assert contract_dispatch.verify_password(email, GOOD_PASSWORD), "the password from stdin was not stored"
    assert stored(email).first_login_at is not None

    again = run_cli(env, "set-password", "--email", email, "--code", code, stdin="another long password\n")
    assert (again.returncode, again.stderr) == (1, wrong_code.stderr), again
    spent = run_cli(env, "verify-code", "--email", email, "--code", code)
    assert spent.returncode == 1, spent


def test_odd_input_matches_nothing_or_is_refused_by_name(database: str) -> None:
    """Never an exception other than the refusals: what a command line or a form may pass."""
    email, code = new_account()
    # A code copied out of an email often brings its line break along.
    assert check(email, code + "\r\n")
    assert check(email, "\n" + code.lower() + "\n")
    # Lone surrogates: how Python reads bytes that are not UTF-8 from a command line.
    assert not check(email, code[:-1] + "\udcff")
    assert not check(email[:3] + "\udcff" + email[3:], code)
    with pytest.raises(PasswordRefused) as not_text:
        spend(email, code, GOOD_PASSWORD + "\udcff")
    assert not_text.value.code == "password_refused" and "not text" in not_text.value.message
    spend(email, code)


def test_cli_first_login_odd_input_gets_a_named_answer(
    database: str, test_environment: dict[str, str], tmp_path: Path
) -> None:
    email, code = new_account()
    env = {**test_environment, "DATABASE_URL": database}

    # Bytes that are not UTF-8 in an argument: refused like any wrong code or unknown address.
    for args in (
        ("--email", email, "--code", code[:-1] + "\udcff"),
        ("--email", "a\udcff" + email, "--code", code),
    ):
        result = run_cli(env, "verify-code", *args)
        assert result.returncode == 1 and result.stderr.startswith("access_code_refused: "), describe(result)

    command = [CLI, "set-password", "--email", email, "--code", code]
    not_utf8 = subprocess.run(
        command, env=env, input=b"\xff\xfe not utf-8\n", capture_output=True, timeout=COMMAND_TIMEOUT_SECONDS
    )
    assert not_utf8.returncode == 2, not_utf8
    assert not_utf8.stderr.startswith(b"password_refused: The password is not text"), not_utf8
    closed = subprocess.run(
        command,
        env=env,
        capture_output=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        preexec_fn=lambda: os.close(0),  # as `<&-` does
    )
    assert closed.returncode == 2 and closed.stderr.startswith(b"password_refused: No password"), closed
    # Only the wrong code was counted; the code not spent, and with the email's line
    # break it is still the code.
    assert stored(email).access_code_failed_attempts == 1
    valid = run_cli(env, "verify-code", "--email", email, "--code", code + "\r\n")
    assert (valid.returncode, valid.stdout) == (0, "valid\n"), describe(valid)

    # A mistyped database path: told so, and nothing created there.
    nowhere = tmp_path / "nowhere" / "cd.db"
    for command_line in (
        ("verify-code", "--email", email, "--code", code),
        ("set-password", "--email", email, "--code", code),
    ):
        missing = run_cli(
            {**env, "DATABASE_URL": f"sqlite:///{nowhere}"}, *command_line, stdin=GOOD_PASSWORD + "\n"
        )
        assert missing.returncode == 3, describe(missing)
        assert missing.stderr.startswith(f"unavailable: no database at {nowhere}"), describe(missing)
    assert not nowhere.parent.exists()


@pytest.mark.parametrize("step", ["verify_code", "set_password"])
def test_a_code_is_verified_while_no_transaction_holds_the_write_lock(
    sqlite_database: str, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """On SQLite every transaction holds the one write lock from its start: a verification
    inside the read's transaction made every worker's transaction wait through it."""
    email, code = new_account()
    work = (lambda: check(email, code)) if step == "verify_code" else (lambda: spend(email, code))
    outcome, calls = run_with_argon2_held(
        monkeypatch, partial(take_write_lock, sqlite_database), work, method="verify"
    )
    assert calls, "the code was never verified"
    assert outcome is (True if step == "verify_code" else None)
    if step == "set_password":
        assert stored(email).first_login_at == SOON
