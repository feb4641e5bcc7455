"""Race-proof binding (issue 6, item 2): two sends for one new address, two companies.

Each race is two ``send_contract`` messages for the same new address with two
different company names, processed at the same time by two different processes.
Exactly one company must be bound; the other send is refused with
``email_bound_to_other_company``; exactly one invitation goes out, the winner's.

- ``test_races_between_worker_processes``: ``RACES`` races on PostgreSQL through
  real ``contract-dispatch worker`` processes consuming from Redis. The two
  contenders of a race go to two namespaces (lanes), each consumed by a worker of
  its own, so they are always handled by two different processes. The races go in
  waves of ``WORKER_THREADS``, each held at the database and released at once: the
  test reserves the wave's contracts in one transaction (what the producer does
  before enqueueing), enqueues them, and commits once every worker thread of both
  workers waits behind that transaction. The message log then shows each race's
  two contenders in flight at the same time in two processes.
- ``test_races_released_by_a_barrier``: on SQLite and PostgreSQL, two processes
  run the actor's function, each race released at the same instant by a barrier.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session, col, select

from models.account import Account
from models.contract import Contract
from models.delivery import EmailDelivery
from models.messages import SendContract, parse_message
from models.sending import reserve_contract
from models.types import utc_now
from models.workspace import set_workspace
from tests.conftest import _postgres_schema_url
from tests.processes import WorkerProcess
from tests.sendgrid_standin import SendGridStandIn
from tests.support import RedisServer, contract_payload, push_messages, readme_message, unique, wait_until
from workers.database import get_engine, session_scope

#: Races run through worker processes (the issue's figure).
RACES = 200

#: Races released by a barrier, per database.
BARRIER_RACES = 60

#: Threads of each lane's worker process: that many races start at the very same instant.
WORKER_THREADS = 4

#: Starting a worker process (an interpreter, the imports, the first heartbeat), in seconds.
WORKER_START_SECONDS = 60.0

#: Every race decided and every winner's invitation sent, in seconds.
SETTLE_SECONDS = 60.0

#: Access-code hashing is not what these tests measure: the cheapest parameters argon2 allows
#: keep 200 winners' codes quick to issue.
FAST_HASHING = {"ARGON2_MEMORY_KIB": "1024", "ARGON2_TIME_COST": "1"}

WORKSPACE = "ws-race"

LANES = ("x", "y")

# -- the races ------------------------------------------------------------------


def race_pairs(count: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``count`` races: two sends for one new address, with two company names."""
    pairs = []
    for _ in range(count):
        email = f"race-{uuid.uuid4().hex[:12]}@example.com"
        first, second = (
            contract_payload(
                email=email, company_name=f"Course {n} {uuid.uuid4().hex[:8]} SAS", workspace_id=WORKSPACE
            )
            for n in (1, 2)
        )
        pairs.append((first, second))
    return pairs


def assert_each_race_bound_one_company(
    url: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]], standin: SendGridStandIn | None
) -> None:
    """One contract sent and one refused per race, the account the winner's, one invitation."""
    contract_ids = [p["contract_id"] for pair in pairs for p in pair]
    emails = [pair[0]["email"] for pair in pairs]
    with session_scope(url) as session:
        contracts = {
            c.id: (c.status, c.error_code, c.error_message, c.account_id)
            for c in session.exec(select(Contract).where(col(Contract.id).in_(contract_ids)))
        }
        accounts: dict[str, list[tuple[int | None, str]]] = {}
        for account in session.exec(select(Account).where(col(Account.email).in_(emails))):
            accounts.setdefault(account.email, []).append((account.id, account.company_name))
        deliveries: dict[str, list[tuple[str, str, int]]] = {}
        for delivery in session.exec(select(EmailDelivery).where(col(EmailDelivery.recipient).in_(emails))):
            deliveries.setdefault(delivery.recipient, []).append(
                (delivery.contract_id, delivery.kind, delivery.step)
            )
    for first, second in pairs:
        email = first["email"]
        outcomes = [contracts[p["contract_id"]] for p in (first, second)]
        assert sorted(o[0] for o in outcomes) == ["rejected", "sent"], (email, outcomes)
        winner, loser = (first, second) if outcomes[0][0] == "sent" else (second, first)
        won, lost = contracts[winner["contract_id"]], contracts[loser["contract_id"]]
        assert lost[1] == "email_bound_to_other_company", lost
        assert lost[2], lost
        assert winner["company_name"] not in lost[2], "a refusal must not name the bound company"
        assert lost[3] is None, "the refused contract is attached to no account"
        (bound,) = accounts[email]  # exactly one account for the address
        assert bound[1] == winner["company_name"], "the account is bound to the winner's company"
        assert won[3] == bound[0]
        assert deliveries[email] == [(winner["contract_id"], "invitation", 0)], "one invitation, the winner's"
        if standin is not None:
            received = [r for r in standin.accepted if r.to == [email]]
            assert [r.reference for r in received] == [f"invitation:{winner['contract_id']}:{email}:0"]


def prepare(url: str) -> None:
    with session_scope(url) as session:
        set_workspace(session, WORKSPACE, ["rg-1"])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL schema of this test's own (CI=true: must be there)."""
    urls = _postgres_schema_url()
    url = next(urls)
    prepare(url)
    try:
        yield url
    finally:
        for _ in urls:  # drops the schema
            pass


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'races.db'}"
    prepare(url)
    return url


@pytest.fixture
def namespaces(redis_server: RedisServer) -> Iterator[dict[str, str]]:
    """One Redis namespace per lane, removed afterwards."""
    names = {lane: unique(f"races-{lane}") for lane in LANES}
    yield names
    client = redis_server.client()
    try:
        for name in names.values():
            keys = list(client.scan_iter(match=f"{name}:*"))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


# -- through worker processes ---------------------------------------------------------


def worker_env(test_environment: dict[str, str], tmp_path: Path, **settings: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(test_environment)
    env.update(DATA_DIR=str(tmp_path / "data"), **FAST_HASHING)
    env.update(settings)
    return env


def blocked_behind(url: str, holder_pid: int) -> int:
    """How many database sessions wait for the holder's transaction."""
    with Session(get_engine(url)) as session:
        return int(
            session.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE :holder = ANY(pg_blocking_pids(pid))"),
                {"holder": holder_pid},
            ).scalar_one()
        )


def all_waiting(url: str, holder_pid: int, *, count: int) -> Callable[[], bool]:
    """A condition: exactly ``count`` database sessions wait for the holder's transaction."""
    return lambda: blocked_behind(url, holder_pid) == count


def settled(url: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> bool:
    """Every race decided and every invitation recorded as sent."""
    contract_ids = [p["contract_id"] for pair in pairs for p in pair]
    with session_scope(url) as session:
        statuses = list(session.exec(select(Contract.status).where(col(Contract.id).in_(contract_ids))).all())
        unsent = session.exec(
            select(EmailDelivery.id).where(
                col(EmailDelivery.contract_id).in_(contract_ids), EmailDelivery.status != "sent"
            )
        ).first()
    done = len(statuses) == len(contract_ids) and all(s in ("sent", "rejected") for s in statuses)
    return done and statuses.count("sent") == len(pairs) and unsent is None


def processing_windows(logs: list[str]) -> dict[str, tuple[int, float, float]]:
    """Each send_contract's worker process and processing window (seconds), from the message log."""
    windows = {}
    for log in logs:
        for line in log.splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if entry.get("logger") != "contract_dispatch.messages" or entry.get("actor") != "send_contract":
                continue
            ended = datetime.fromisoformat(entry["time"]).timestamp()
            started = ended - float(entry["duration_ms"]) / 1000
            windows[entry["contract_id"]] = (int(entry["pid"]), started, ended)
    return windows


@pytest.mark.postgres
def test_races_between_worker_processes(
    postgres_url: str,
    namespaces: dict[str, str],
    redis_server: RedisServer,
    standin: SendGridStandIn,
    test_environment: dict[str, str],
    tmp_path: Path,
) -> None:
    pairs = race_pairs(RACES)
    workers = {
        lane: WorkerProcess(
            worker_env(
                test_environment,
                tmp_path,
                DATABASE_URL=postgres_url,
                REDIS_NAMESPACE=namespaces[lane],
                # One JSON object per line: the message log's fields, time and process id.
                LOG_FORMAT="json",
            ),
            log_path=tmp_path / f"worker-{lane}.log",
            threads=WORKER_THREADS,
        ).start()
        for lane in LANES
    }
    client = redis_server.client()
    try:

        def consuming() -> bool:
            for lane, worker in workers.items():
                assert worker.alive(), worker.log()
                if not client.zcard(f"{namespaces[lane]}:__heartbeats__"):
                    return False
            return True

        wait_until(consuming, timeout=WORKER_START_SECONDS, what="both lanes' workers to consume")

        started = time.monotonic()
        # Waves of WORKER_THREADS races. The producer's reservation of a wave's
        # contracts is held open while its messages are enqueued: every worker
        # thread of both lanes takes one and waits behind it, then one commit
        # releases them all at the same instant.
        for wave_start in range(0, RACES, WORKER_THREADS):
            wave = pairs[wave_start : wave_start + WORKER_THREADS]
            with Session(get_engine(postgres_url)) as holder:
                now = utc_now()
                for pair in wave:
                    for payload in pair:
                        reserve_contract(holder, parse_message(SendContract, payload), now=now)
                holder.flush()
                holder_pid = int(holder.execute(text("SELECT pg_backend_pid()")).scalar_one())
                for index, lane in enumerate(LANES):
                    push_messages(
                        client,
                        namespaces[lane],
                        *(readme_message("send_contract", [pair[index]]) for pair in wave),
                    )
                wait_until(
                    all_waiting(postgres_url, holder_pid, count=len(LANES) * len(wave)),
                    timeout=WORKER_START_SECONDS,
                    what="each worker thread to wait behind the held reservation",
                )
                holder.commit()

        wait_until(lambda: settled(postgres_url, pairs), timeout=SETTLE_SECONDS, what="every race to settle")
        elapsed = time.monotonic() - started
        assert_each_race_bound_one_company(postgres_url, pairs, standin)
    finally:
        client.close()
        for worker in workers.values():
            worker.terminate()

    # Every race really was one: both contenders in two processes at the same time.
    windows = processing_windows([worker.log() for worker in workers.values()])
    for first, second in pairs:
        a, b = windows[first["contract_id"]], windows[second["contract_id"]]
        assert a[0] != b[0], "the two contenders of a race ran in two different processes"
        assert a[1] < b[2] and b[1] < a[2], "the two contenders of a race were processed at the same time"
    print(f"\n[races] {RACES} races through worker processes in {elapsed:.1f} s")


# -- released by a barrier ---------------------------------------------------------------


def contender(payloads: list[dict[str, Any]], barrier: Barrier, outcomes: Any) -> None:
    """One side of every race: wait for the other side, then run the actor's function."""
    import actors
    from models.errors import Rejected

    for payload in payloads:
        barrier.wait(timeout=30)
        try:
            actors.send_contract.fn(payload)
        except Rejected as refusal:
            outcomes.put((payload["contract_id"], refusal.code))
        else:
            outcomes.put((payload["contract_id"], "sent"))


@pytest.mark.parametrize("database_kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_races_released_by_a_barrier(
    database_kind: str,
    request: pytest.FixtureRequest,
    namespaces: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url: str = request.getfixturevalue("sqlite_url" if database_kind == "sqlite" else "postgres_url")
    # The spawned processes read their settings from this environment.
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("REDIS_NAMESPACE", namespaces["x"])
    for name, value in FAST_HASHING.items():
        monkeypatch.setenv(name, value)

    pairs = race_pairs(BARRIER_RACES)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    outcomes = context.Queue()
    sides = [
        context.Process(target=contender, args=([pair[side] for pair in pairs], barrier, outcomes))
        for side in (0, 1)
    ]
    for side in sides:
        side.start()
    try:
        results = dict(outcomes.get(timeout=SETTLE_SECONDS) for _ in range(2 * BARRIER_RACES))
    finally:
        for side in sides:
            side.join(timeout=30)
            if side.exitcode is None:
                side.kill()
    assert [side.exitcode for side in sides] == [0, 0]

    for first, second in pairs:
        answers = sorted(results[p["contract_id"]] for p in (first, second))
        assert answers == ["email_bound_to_other_company", "sent"], answers
    assert_each_race_bound_one_company(url, pairs, None)
