"""Other transactions go on while argon2id works: the harness of the tests that check it.

On SQLite every transaction takes the database's one write lock at its start
(``BEGIN IMMEDIATE``): a hash or a verification (tens of milliseconds) run inside
one made every other worker's transaction wait. On PostgreSQL a transaction locks
only its rows: a new code is hashed inside it, and other contracts go on meanwhile.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import make_url

from models.access_codes import GatedHasher
from tests.support import wait_until

T = TypeVar("T")

#: How long a held argon2id call, and the work around it, may take in these tests, in seconds.
HOLD_TIMEOUT_SECONDS = 60


def take_write_lock(database_url: str) -> None:
    """Take and release the write lock from a connection of its own, waiting at most 1 s for it."""
    other = sqlite3.connect(make_url(database_url).database or "", timeout=1.0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


def run_with_argon2_held(
    monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], object], work: Callable[[], T], *, method: str
) -> tuple[T, list[tuple[Any, ...]]]:
    """``work()`` in a thread, its ``GatedHasher.<method>`` calls held until ``meanwhile()`` returned.

    While the first call is held, ``meanwhile`` (``take_write_lock``, say) must
    succeed. Returns what ``work`` returned (or raises what it raised) and the
    arguments of each call; work that makes no such call simply runs (its caller
    asserts none was made).
    """
    entered, release = threading.Event(), threading.Event()
    calls: list[tuple[Any, ...]] = []
    original = getattr(GatedHasher, method)

    def held(self: GatedHasher, *args: Any) -> Any:
        calls.append(args)
        entered.set()
        release.wait(timeout=HOLD_TIMEOUT_SECONDS)
        return original(self, *args)

    monkeypatch.setattr(GatedHasher, method, held)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_until(
            lambda: entered.is_set() or not thread.is_alive(),
            timeout=HOLD_TIMEOUT_SECONDS,
            what=f"an argon2id {method} call, or the work's end",
        )
        if entered.is_set():
            meanwhile()
    finally:
        release.set()
        thread.join(timeout=HOLD_TIMEOUT_SECONDS)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], calls
