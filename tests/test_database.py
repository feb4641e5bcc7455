"""The engine cache: one engine and one schema check per database and process."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import inspect

import workers.database as database

#: Worker threads of one process asking for the engine together, as they do at start.
THREADS = 8


def test_threads_asking_at_once_create_the_schema_once(tmp_path, monkeypatch):
    created: list[str] = []
    real_create_tables = database.create_tables

    def slow_create_tables(engine: Any) -> None:
        created.append(str(engine.url))
        # Long enough for every other thread to reach the check meanwhile.
        time.sleep(0.2)
        real_create_tables(engine)

    monkeypatch.setattr(database, "create_tables", slow_create_tables)
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    start = threading.Barrier(THREADS)
    engines: list[Any] = []

    def ask() -> None:
        start.wait()
        engines.append(database.get_engine(url))

    threads = [threading.Thread(target=ask) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(created) == 1, created
        assert len(engines) == THREADS and all(engine is engines[0] for engine in engines)
        assert {"contracts", "accounts", "email_deliveries"} <= set(inspect(engines[0]).get_table_names())
    finally:
        engines[0].dispose()
