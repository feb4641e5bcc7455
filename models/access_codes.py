"""Temporary access codes (the temporary password of a new account).

A code is never stored: each issue draws a random nonce from ``secrets``, the
code is HMAC-SHA256(SECRET_KEY, nonce) mapped onto an unambiguous alphabet, and
only its argon2id hash is kept. The email renderer re-derives the same code from
the nonce, so a retried email carries the same code without it ever being in
Redis, SQL or a log line. Issuing again replaces the nonce and the hash, which
invalidates the previous code.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from argon2 import PasswordHasher, Type

from models.account import Account
from models.errors import AccessCodeNeeded

T = TypeVar("T")

#: No 0/O, 1/I/L: a code read from an email and typed by hand must not be ambiguous.
ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"

#: Characters per code: 12 from 31 symbols is about 59 bits.
CODE_LENGTH = 12

#: Bytes of randomness per issue (the nonce).
NONCE_BYTES = 16

_DERIVATION_LABEL = b"contract-dispatch/access-code/v1:"

#: How long ``GatedHasher.start`` waits for its threads to be running, in seconds.
START_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, kw_only=True)
class HashParameters:
    """argon2id cost parameters; memory in KiB.

    ``concurrency`` caps the hashes running at once in this process (None: one
    per core). It is no cost parameter: hashes made under any cap are the same.
    """

    memory_kib: int
    time_cost: int
    parallelism: int
    concurrency: int | None = field(default=None, compare=False)


class GatedHasher:
    """An argon2id hasher that runs its hashes on a fixed number of threads of its own.

    Each hash takes ``memory_kib`` of memory and a core for tens of
    milliseconds: eight worker threads issuing codes together would hold eight
    times the memory and take as long as one at a time, so the others wait
    their turn here instead (the memory peak stays flat, the throughput the same).

    Always the same threads, not a semaphore among the callers: glibc keeps a
    freed block in the arena of the thread that used it, so each hashing thread
    reuses its one block. Hashing on whichever worker thread called would leave
    a block in every worker thread's arena, or (with blocks mapped and unmapped
    on each hash) spend as much CPU in page faults as in a third of the hash.
    Started early (``start``), each hashing thread also keeps an arena of its
    own: glibc makes at most eight arenas per core, and a thread started after
    that shares a busy one, whose small blocks then split the freed block so
    the next hash maps a second one.
    """

    def __init__(self, hasher: PasswordHasher, *, slots: int) -> None:
        self._hasher = hasher
        self._threads = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="argon2")
        self.slots = slots
        #: The hashing threads, once ``start`` has started them.
        self.threads: list[threading.Thread] = []

    def start(self, *, timeout_seconds: float = START_TIMEOUT_SECONDS) -> None:
        """Start every hashing thread now, instead of with the first hashes.

        Each waits at a barrier until all are running, so none is handed a
        second start; ``timeout_seconds`` bounds that wait, in seconds.
        """
        barrier = threading.Barrier(self.slots)

        def arrive() -> threading.Thread:
            barrier.wait(timeout_seconds)
            return threading.current_thread()

        started = [self._threads.submit(arrive) for _ in range(self.slots)]
        self.threads = [future.result() for future in started]

    def hash(self, secret: str) -> str:
        """The encoded argon2id hash of ``secret``."""
        return self._threads.submit(self._hasher.hash, secret).result()

    def hash_many(self, plaintexts: Sequence[str]) -> list[str]:
        """The hash of each of ``plaintexts``, in order, ``slots`` at a time."""
        futures = [self._threads.submit(self._hasher.hash, plaintext) for plaintext in plaintexts]
        return [future.result() for future in futures]

    def verify(self, encoded: str, secret: str) -> bool:
        """True, or argon2's VerifyMismatchError (or another VerificationError)."""
        return self._threads.submit(self._hasher.verify, encoded, secret).result()

    def check_needs_rehash(self, encoded: str) -> bool:
        """Whether ``encoded`` was made with other costs than these (no hashing)."""
        return self._hasher.check_needs_rehash(encoded)


def argon2id_hasher(parameters: HashParameters) -> PasswordHasher:
    """argon2-cffi's hasher with these costs, hashing in the calling thread (no gate)."""
    return PasswordHasher(
        time_cost=parameters.time_cost,
        memory_cost=parameters.memory_kib,
        parallelism=parameters.parallelism,
        type=Type.ID,
    )


@functools.cache
def password_hasher(parameters: HashParameters) -> GatedHasher:
    """An argon2id hasher with the given costs (cached: one gate per process)."""
    return GatedHasher(argon2id_hasher(parameters), slots=parameters.concurrency or os.cpu_count() or 1)


def derive_code(secret_key: bytes, nonce: str) -> str:
    """The code of one issue: uniform over ``ALPHABET`` by rejection sampling."""
    code: list[str] = []
    counter = 0
    # 31 symbols: keep bytes below 248 (= 8 * 31) so every symbol is equally likely.
    limit = 256 - 256 % len(ALPHABET)
    while len(code) < CODE_LENGTH:
        block = hmac.new(
            secret_key, _DERIVATION_LABEL + nonce.encode() + counter.to_bytes(4, "big"), hashlib.sha256
        ).digest()
        for byte in block:
            if byte < limit:
                code.append(ALPHABET[byte % len(ALPHABET)])
                if len(code) == CODE_LENGTH:
                    break
        counter += 1
    return "".join(code)


class HasFirstLogin(Protocol):
    """An account, or what binding read of one: when the client first logged in."""

    @property
    def first_login_at(self) -> datetime | None: ...


def needs_access_code(account: HasFirstLogin) -> bool:
    """A new account, or one that never logged in, gets (fresh) access codes."""
    return account.first_login_at is None


@dataclass(frozen=True, kw_only=True)
class AccessCodePolicy:
    """What issuing a code needs: the server secret, the hash costs and the lifetime."""

    secret_key: bytes = field(repr=False)
    hash_parameters: HashParameters
    ttl: timedelta


def access_code_fields(*, policy: AccessCodePolicy, now: datetime) -> dict[str, object]:
    """The account columns of a new code (the previous one stops working); only its hash is kept."""
    (fields,) = access_code_fields_many(policy=policy, now=now, count=1)
    return fields


def access_code_fields_many(
    *, policy: AccessCodePolicy, now: datetime, count: int
) -> list[dict[str, object]]:
    """``access_code_fields`` of ``count`` new codes, hashed on all of the hasher's threads at once."""
    nonces = [secrets.token_urlsafe(NONCE_BYTES) for _ in range(count)]
    hashes = password_hasher(policy.hash_parameters).hash_many(
        [derive_code(policy.secret_key, nonce) for nonce in nonces]
    )
    return [
        {
            "access_code_nonce": nonce,
            "access_code_hash": hashed,
            "access_code_issued_at": now,
            "access_code_expires_at": now + policy.ttl,
            "access_code_used_at": None,
            "access_code_failed_attempts": 0,
        }
        for nonce, hashed in zip(nonces, hashes, strict=True)
    ]


def issue_access_code(account: Account, *, policy: AccessCodePolicy, now: datetime) -> None:
    """Give ``account`` a new code (the previous one stops working); store only its hash."""
    apply_access_code(account, access_code_fields(policy=policy, now=now))


#: A new code's account columns (``access_code_fields``), made when first asked for.
CodeSource = Callable[[], Mapping[str, object]]


class CodeOnDemand:
    """A new code's account columns, hashed the first time a transaction asks for them.

    Every later call returns the same columns (the same code). A transaction that
    finds its account needs no code (the client logged in) never calls it, so
    never pays for a hash.
    """

    def __init__(self, *, policy: AccessCodePolicy, now: datetime) -> None:
        self._policy = policy
        self._now = now
        self._fields: Mapping[str, object] | None = None

    def __call__(self) -> Mapping[str, object]:
        if self._fields is None:
            self._fields = access_code_fields(policy=self._policy, now=self._now)
        return self._fields


def with_access_code(
    run: Callable[[CodeSource | None], T],
    *,
    policy: AccessCodePolicy,
    now: datetime,
    hash_in_transaction: bool,
) -> T:
    """``run`` once, with the new code its transaction may need; twice on a database-wide lock.

    ``run`` opens its transaction and gives the code it needs to ``apply_access_code``
    (or an insert), through ``given_code``. An account that needs no code (it logged
    in) costs no hash and one transaction either way.

    ``hash_in_transaction`` (PostgreSQL, whose transactions lock rows): ``run`` gets a
    ``CodeOnDemand`` and the hash runs inside the transaction, which holds only the
    contract's row meanwhile (and the account's, when it exists). One transaction, where hashing
    outside takes a first one that finds the account needs a code and rolls back
    (five round trips to the database per new account).

    Otherwise (SQLite, whose transactions take the one write lock at their start):
    ``run(None)``, and if it raises ``AccessCodeNeeded``, the code is hashed between
    two transactions and ``run`` goes again with it: an argon2id hash (tens of
    milliseconds of CPU) inside a transaction would make every other writer wait.
    """
    if hash_in_transaction:
        return run(CodeOnDemand(policy=policy, now=now))
    try:
        return run(None)
    except AccessCodeNeeded:
        fields = access_code_fields(policy=policy, now=now)
        return run(lambda: fields)


def given_code(source: CodeSource | None) -> Mapping[str, object]:
    """The code a transaction was given, or ``AccessCodeNeeded`` (see ``with_access_code``)."""
    if source is None:
        raise AccessCodeNeeded
    return source()


def apply_access_code(account: Account, fields: Mapping[str, object]) -> None:
    """Give ``account`` the code of ``access_code_fields`` made earlier (outside its transaction)."""
    for name, value in fields.items():
        setattr(account, name, value)


class HasCodeNonce(Protocol):
    """An account, or what an email read of one: the nonce of its current code."""

    @property
    def access_code_nonce(self) -> str | None: ...


def current_access_code(account: HasCodeNonce, *, secret_key: bytes) -> str | None:
    """The plaintext of the account's current code, for the email that carries it."""
    if account.access_code_nonce is None:
        return None
    return derive_code(secret_key, account.access_code_nonce)
