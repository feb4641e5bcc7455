"""Reminder sweep: its cost must follow the number of due contracts, not the table's size.

For each table size (100,000 and 1,000,000 contracts by default) a fresh
database is filled with a realistic mix (most contracts signed, some cancelled,
rejected, waiting for a later reminder or done with reminders) in which the
same number of contracts (10,000) are due, spread evenly through the table (the
worst case for locality). Then, on the same servers and in the same run:

- the sweep (``workers.reminders.run_sweep``: claim each reminder, record its
  email, commit per batch, enqueue the batch in one Redis pipeline) is timed,
  with its phases;
- the due query alone (the sweep's own SELECT, all due rows at once) is timed,
  and its plan shown (PostgreSQL: EXPLAIN ANALYZE; SQLite: EXPLAIN QUERY PLAN);
- the baseline: as many single-row UPDATEs by primary key as there are due
  contracts, through the same engine and sessions, committed per batch like the
  sweep; plus, for scale, enqueueing as many deliver_email messages;
- apart from the main figure, a few due contracts whose client never logged in
  and whose code expired are swept on their own: renewing a code costs one
  argon2id hash (OWASP parameters), which dwarfs everything else.

The figure that matters is the ratio of the largest table's sweep to the
smallest's: close to 1 means the cost grows with due contracts only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, text, update
from sqlmodel import Session, select

from bench import Database, DatabaseKind, Workbench, against, machine, median, seconds, timed

DESCRIPTION = "reminder sweep over growing tables with the same number of due contracts"

#: The sweep runs as of a Tuesday, 10:00 in Paris: inside the default sending window.
AS_OF = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)

#: The contracts needing a code renewal fall due half an hour later, apart from the others.
RENEWALS_DUE_AFTER = timedelta(minutes=30)

#: The column whose index the due query must go through.
DUE_COLUMN = "next_reminder_at"

#: First reminder delay of the populated contracts (the default policy's), in seconds.
FIRST_DELAY_SECONDS = 3 * 86400

#: Waiting contracts are due between one and eleven days after AS_OF.
WAITING_SPREAD_SECONDS = 10 * 86400

#: A stand-in for an argon2id hash: the sweep reads and replaces hashes, never checks them.
PLACEHOLDER_HASH = "$argon2id$v=19$m=19456,t=2,p=1$YmVuY2g$YmVuY2g"


def _int_list(value: str) -> list[int]:
    return [int(part.replace("_", "")) for part in value.split(",") if part]


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--sizes",
        type=_int_list,
        default=[100_000, 1_000_000],
        help="table sizes in contracts, comma-separated (default 100000,1000000)",
    )
    group.add_argument("--due", type=int, default=10_000, help="due contracts in every table (default 10000)")
    group.add_argument("--repeat", type=int, default=3, help="sweeps per size; medians are shown (default 3)")
    group.add_argument(
        "--renewals",
        type=int,
        default=100,
        help="due contracts with an expired code, swept apart to show the argon2id cost; "
        "0 skips (default 100)",
    )
    group.add_argument(
        "--batch-size", type=int, default=None, help="REMINDER_BATCH_SIZE (default: the service's default)"
    )


# -- the data -----------------------------------------------------------------------


def timestamp(kind: DatabaseKind, moment: datetime) -> str:
    """A bound timestamp both dialects' SQL below can add seconds to."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + ("+00:00" if kind == "postgresql" else "")


def at(kind: DatabaseKind, base: str, offset: str = "0") -> str:
    """SQL for the bound timestamp ``base`` plus ``offset`` seconds, as the service stores it.

    SQLite compares timestamps as text: they must be written exactly as
    SQLAlchemy writes them (microseconds included) or the sweep's guards, which
    compare the value read with the value stored, would never match.
    """
    if kind == "postgresql":
        return f"(CAST(:{base} AS timestamptz) + ({offset}) * interval '1 second')"
    return f"(strftime('%Y-%m-%d %H:%M:%S', :{base}, printf('%+d seconds', {offset})) || '.000000')"


def _rows(kind: DatabaseKind) -> str:
    """The numbered rows of the table and the category of each, as a WITH clause.

    Contract i is due when it is one of the first ``due`` multiples of the
    stride (size // due): due contracts are spread through the whole table. The
    first few of the next ones need a code renewal; the rest are, by i mod 20:
    70 % signed, 5 % cancelled, 5 % rejected, 15 % waiting for a later reminder,
    5 % with every reminder sent.
    """
    if kind == "postgresql":
        numbers = "seq AS (SELECT i FROM generate_series(1, CAST(:n AS integer)) AS i)"
    else:
        numbers = "seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :n)"
    return f"""
        WITH RECURSIVE {numbers},
        rows AS (
            SELECT i, i / :stride AS k,
                CASE
                    WHEN i % :stride = 0 AND i / :stride <= :due THEN 'due'
                    WHEN i % :stride = 1 AND i / :stride < :renewals THEN 'renew'
                    WHEN i % 20 < 14 THEN 'signed'
                    WHEN i % 20 = 14 THEN 'cancelled'
                    WHEN i % 20 = 15 THEN 'rejected'
                    WHEN i % 20 < 19 THEN 'waiting'
                    ELSE 'exhausted'
                END AS cat
            FROM seq
        ),
        tagged AS (
            SELECT i, k, cat,
                CASE WHEN cat = 'renew' OR (cat = 'due' AND k % 2 = 1) THEN 1 ELSE 0 END AS fresh
            FROM rows
        )
    """


def _next_reminder(kind: DatabaseKind, shift: str = "0") -> str:
    return f"""CASE cat
        WHEN 'due' THEN {at(kind, "t_due", f"k + {shift}")}
        WHEN 'renew' THEN {at(kind, "t_renew", f"k + {shift}")}
        WHEN 'waiting' THEN {at(kind, "t_future", f"i % {WAITING_SPREAD_SECONDS} + {shift}")}
    END"""


def _populate_statements(kind: DatabaseKind) -> list[str]:
    rows = _rows(kind)
    empty_json = "CAST('[]' AS json)" if kind == "postgresql" else "'[]'"
    accounts = f"""{rows}
        INSERT INTO accounts (
            id, email, company_name, created_at, first_login_at, password_hash, access_code_hash,
            access_code_nonce, access_code_issued_at, access_code_expires_at, access_code_failed_attempts
        )
        SELECT i, 'client-' || i || '@bench.example', 'Company ' || i, {at(kind, "t_past")},
            CASE WHEN fresh = 0 THEN {at(kind, "t_past", "3600")} END,
            CASE WHEN fresh = 0 THEN '{PLACEHOLDER_HASH}' END,
            CASE WHEN fresh = 1 THEN '{PLACEHOLDER_HASH}' END,
            CASE WHEN fresh = 1 THEN 'nonce-' || i END,
            CASE WHEN fresh = 1 THEN {at(kind, "t_past")} END,
            CASE WHEN cat = 'renew' THEN {at(kind, "t_expired")}
                 WHEN fresh = 1 THEN {at(kind, "t_valid")} END,
            0
        FROM tagged"""
    cycle_start = _next_reminder(kind, f"-{FIRST_DELAY_SECONDS}")
    contracts = f"""{rows}
        INSERT INTO contracts (
            id, status, error_code, content_hash, workspace_id, email, company_name, lead_source, title,
            locale, sections, signatories, account_id, access_code_issued, created_at, updated_at, sent_at,
            signed_at, reminder_cycle_started_at, reminder_count, next_reminder_at, cancelled_at
        )
        SELECT 'bench-' || i,
            CASE cat WHEN 'signed' THEN 'signed' WHEN 'cancelled' THEN 'cancelled'
                     WHEN 'rejected' THEN 'rejected' ELSE 'sent' END,
            CASE WHEN cat = 'rejected' THEN 'invalid_email' END,
            '', 'ws-bench', 'client-' || i || '@bench.example', 'Company ' || i, 'network', cat,
            CASE WHEN i % 5 = 0 THEN 'en' ELSE 'fr' END, {empty_json}, {empty_json}, i, fresh = 1,
            {at(kind, "t_past")}, {at(kind, "t_past", "60")}, {at(kind, "t_past", "60")},
            CASE WHEN cat = 'signed' THEN {at(kind, "t_past", "86400")} END,
            CASE WHEN cat IN ('due', 'renew', 'waiting') THEN {cycle_start}
                 ELSE {at(kind, "t_past", "60")} END,
            CASE cat WHEN 'waiting' THEN i % 3 WHEN 'exhausted' THEN 3 WHEN 'signed' THEN i % 2 ELSE 0 END,
            {_next_reminder(kind)},
            CASE WHEN cat = 'cancelled' THEN {at(kind, "t_past", "86400")} END
        FROM tagged"""
    deliveries = f"""{rows}
        INSERT INTO email_deliveries (
            kind, contract_id, recipient, step, locale, includes_access_code, status, attempts,
            provider_message_id, created_at, updated_at, sent_at
        )
        SELECT 'invitation', 'bench-' || i, 'client-' || i || '@bench.example', 0,
            CASE WHEN i % 5 = 0 THEN 'en' ELSE 'fr' END, fresh = 1, 'sent', 1, 'msg-' || i,
            {at(kind, "t_past", "60")}, {at(kind, "t_past", "60")}, {at(kind, "t_past", "61")}
        FROM tagged WHERE cat <> 'rejected'"""
    return [accounts, contracts, deliveries]


def _parameters(kind: DatabaseKind, *, size: int, due: int, renewals: int) -> dict[str, Any]:
    return {
        "n": size,
        "stride": size // due,
        "due": due,
        "renewals": renewals,
        # Due contracts k = 1..due fall due one second apart, the last one a second before AS_OF.
        "t_due": timestamp(kind, AS_OF - timedelta(seconds=due + 1)),
        "t_renew": timestamp(kind, AS_OF + RENEWALS_DUE_AFTER),
        "t_future": timestamp(kind, AS_OF + timedelta(days=1)),
        "t_past": timestamp(kind, AS_OF - timedelta(days=30)),
        "t_expired": timestamp(kind, AS_OF - timedelta(days=1)),
        "t_valid": timestamp(kind, AS_OF + timedelta(days=5)),
    }


def populate(engine: Engine, database: Database, *, size: int, due: int, renewals: int) -> None:
    """Fill accounts, contracts and their invitations in three INSERT ... SELECT statements."""
    parameters = _parameters(database.kind, size=size, due=due, renewals=renewals)
    with engine.begin() as connection:
        for statement in _populate_statements(database.kind):
            connection.execute(text(statement), parameters)
        if database.kind == "postgresql":
            connection.execute(
                text("SELECT setval(pg_get_serial_sequence('accounts', 'id'), :n)"), {"n": size}
            )
    settle(database)


def settle(database: Database) -> None:
    """PostgreSQL: vacuum and analyse, as autovacuum keeps a live table (SQLite: nothing to do).

    SQLite is left without ANALYZE statistics on purpose: the service never
    gathers them, so its query plans are the ones chosen without.
    """
    if database.admin_url is None:
        return
    admin = create_engine(database.admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            for table in ("accounts", "contracts", "email_deliveries"):
                connection.execute(text(f"VACUUM ANALYZE {table}"))
    finally:
        admin.dispose()


def reset(engine: Engine, database: Database, *, size: int, due: int, renewals: int) -> None:
    """Make the due contracts due again and forget their reminders (not timed)."""
    kind = database.kind
    parameters = _parameters(kind, size=size, due=due, renewals=renewals)
    number = "CAST(substr(id, 7) AS integer)"
    with engine.begin() as connection:
        connection.execute(
            text(
                f"UPDATE contracts SET reminder_count = 0, "
                f"next_reminder_at = {at(kind, 't_due', f'{number} / :stride')} "
                "WHERE title = 'due'"
            ),
            {"t_due": parameters["t_due"], "stride": parameters["stride"]},
        )
        connection.execute(text("DELETE FROM email_deliveries WHERE kind = 'reminder'"))
    settle(database)


# -- measuring ---------------------------------------------------------------------------


def explain(engine: Engine, kind: DatabaseKind, *, limit: int) -> list[str]:
    """The due query's plan: EXPLAIN ANALYZE on PostgreSQL, EXPLAIN QUERY PLAN on SQLite."""
    from models.reminders import due_reminders

    statement = due_reminders(AS_OF, limit).compile(
        dialect=engine.dialect, compile_kwargs={"literal_binds": True}
    )
    prefix = "EXPLAIN (ANALYZE, BUFFERS)" if kind == "postgresql" else "EXPLAIN QUERY PLAN"
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(f"{prefix} {statement}").all()
    return [str(row[0]) if kind == "postgresql" else str(row[-1]) for row in rows]


@contextlib.contextmanager
def phase_timers(phases: dict[str, float]) -> Iterator[None]:
    """Time the sweep's phases by wrapping the functions run_sweep calls (restored after)."""
    import workers.reminders as module

    names = {"sweep_due_reminders": "claim", "_enqueue": "enqueue", "redrive_stale_deliveries": "redrive"}
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[names[name]] = phases.get(names[name], 0.0) + time.perf_counter() - started

        return timed_call

    for name, function in originals.items():
        setattr(module, name, wrap(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


class Check:
    """Facts a run must show: figures of a sweep that did the wrong thing are worthless."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.failures: list[str] = []

    def equal(self, what: str, actual: object, expected: object) -> None:
        if actual != expected:
            self.failures.append(f"{what}: {actual!r}, expected {expected!r}")

    def verify(self) -> None:
        if self.failures:
            raise SystemExit(f"sweep benchmark, {self.where}: " + "; ".join(self.failures))


class SizeRun:
    """The measurements on one table size, in a database of its own."""

    def __init__(
        self, workbench: Workbench, database: Database, options: argparse.Namespace, *, size: int, due: int
    ) -> None:
        from actors.deliver_email import deliver_email
        from workers.database import get_engine
        from workers.settings import get_settings

        self.workbench = workbench
        self.database = database
        self.size = size
        self.due = due
        self.settings = get_settings()
        if options.batch_size:
            self.settings = self.settings.model_copy(update={"reminder_batch_size": options.batch_size})
        self.batch = self.settings.reminder_batch_size
        self.engine = get_engine()
        self.broker = deliver_email.broker
        self.redis = workbench.redis_client()
        self.messages_key = f"{workbench.namespace}:{deliver_email.queue_name}.msgs"
        self.check = Check(f"{database.kind}, {size:,} contracts")
        self.due_ids: list[str] = []

    def populate(self, renewals: int) -> float:
        from models.reminders import due_reminders

        populate_s = timed(
            lambda: populate(self.engine, self.database, size=self.size, due=self.due, renewals=renewals)
        )
        with Session(self.engine) as session:
            self.due_ids = [contract.id for contract in session.exec(due_reminders(AS_OF, self.size)).all()]
            total = session.execute(text("SELECT count(*) FROM contracts")).scalar_one()
        self.check.equal("contracts", total, self.size)
        self.check.equal("due contracts", len(self.due_ids), self.due)
        return populate_s

    def plan(self) -> tuple[list[str], str | None]:
        """The due query's plan (one batch, as the sweep runs it) and the due index it uses."""
        from models.contract import Contract
        from models.upsert import table_of

        plan = explain(self.engine, self.database.kind, limit=self.batch)
        indexes = [index.name for index in table_of(Contract).indexes if DUE_COLUMN in index.columns]
        return plan, next((name for line in plan for name in indexes if name and name in line), None)

    def select_due(self) -> None:
        """The sweep's due query alone, every due row at once."""
        from models.reminders import due_reminders

        with Session(self.engine) as session:
            found = session.exec(due_reminders(AS_OF, self.due)).all()
        self.check.equal("due rows selected", len(found), self.due)

    def pk_updates(self) -> None:
        """The baseline: one UPDATE by primary key per due contract, a transaction per batch."""
        from models.contract import Contract
        from models.upsert import table_of
        from workers.database import session_scope

        contracts = table_of(Contract)
        for start in range(0, len(self.due_ids), self.batch):
            with session_scope() as session:
                for contract_id in self.due_ids[start : start + self.batch]:
                    session.execute(
                        update(contracts).where(contracts.c.id == contract_id).values(updated_at=AS_OF)
                    )

    def enqueue(self) -> None:
        """As many deliver_email messages as due contracts, a pipeline per batch like the sweep's."""
        from actors.deliver_email import enqueue_deliveries

        self.broker.flush_all()
        for start in range(1, self.due + 1, self.batch):
            enqueue_deliveries(list(range(start, min(start + self.batch, self.due + 1))))
        self.check.equal("baseline messages in Redis", self.redis.hlen(self.messages_key), self.due)
        self.broker.flush_all()

    def sweep(self, phases: dict[str, float]) -> float:
        """One sweep over every due contract, timed with its phases, then checked."""
        from models.delivery import EmailDelivery
        from workers.reminders import run_sweep

        with phase_timers(phases):
            started = time.perf_counter()
            report = run_sweep(as_of=AS_OF, settings=self.settings)
            sweep_s = time.perf_counter() - started
        # What the wrapped functions do not cover: commits and the sweep's own record.
        phases["commits"] = sweep_s - sum(phases.values())
        self.check.equal("claimed", report.claimed, self.due)
        self.check.equal("lost races", report.lost_races, 0)
        self.check.equal("postponed", report.postponed, 0)
        self.check.equal("codes renewed", report.codes_renewed, 0)
        self.check.equal("messages in Redis", self.redis.hlen(self.messages_key), self.due)
        with Session(self.engine) as session:
            reminders = session.exec(select(EmailDelivery).where(EmailDelivery.kind == "reminder")).all()
        self.check.equal("reminder rows", len(reminders), self.due)
        self.check.equal(
            "reminder rows with a code", sum(row.includes_access_code for row in reminders), self.due // 2
        )
        self.check.equal("contracts reminded", len({row.contract_id for row in reminders}), self.due)
        self.broker.flush_all()
        return sweep_s

    def renewal_sweep(self, renewals: int) -> dict[str, Any]:
        """A sweep of contracts whose client never logged in and whose code expired."""
        from models.access_codes import derive_code, password_hasher
        from workers.reminders import run_sweep

        parameters = self.settings.hash_parameters()
        hasher = password_hasher(parameters)
        hash_s = timed(lambda: hasher.hash(derive_code(b"bench", "nonce")))
        as_of = AS_OF + RENEWALS_DUE_AFTER + timedelta(seconds=renewals + 1)
        started = time.perf_counter()
        report = run_sweep(as_of=as_of, settings=self.settings)
        sweep_s = time.perf_counter() - started
        self.check.equal("renewal sweep: claimed", report.claimed, renewals)
        self.check.equal("renewal sweep: codes renewed", report.codes_renewed, renewals)
        self.broker.flush_all()
        return {
            "renewals": renewals,
            "sweep_s": sweep_s,
            "per_contract_ms": sweep_s / renewals * 1000,
            "argon2id_hash_ms": hash_s * 1000,
            # Renewed codes are hashed before the batch's transaction, this many at once.
            "hashing_threads": hasher.slots,
            "argon2id": f"{parameters.memory_kib} KiB, t={parameters.time_cost}, p={parameters.parallelism}",
        }

    def close(self) -> None:
        self.redis.close()


def measure_size(
    workbench: Workbench,
    database: Database,
    options: argparse.Namespace,
    size: int,
    *,
    due: int,
    repeat: int,
    renewals: int,
    announce: bool = True,
) -> dict[str, Any]:
    """Populate one table size, then time the sweep and its baselines ``repeat`` times, interleaved."""
    renewals = min(renewals, due)

    def say(text: str) -> None:
        if announce:
            print(f"  {database.kind}, {size:,} contracts: {text} ...", flush=True)

    run = SizeRun(workbench, database, options, size=size, due=due)
    say("populating")
    populate_s = run.populate(renewals)
    plan, plan_index = run.plan()
    runs: dict[str, list[float]] = {"sweep": [], "select_due": [], "pk_updates": [], "enqueue": []}
    phase_runs: list[dict[str, float]] = []
    renewal: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    for attempt in range(repeat):
        say(f"run {attempt + 1} of {repeat}")
        runs["select_due"].append(timed(run.select_due))
        runs["pk_updates"].append(timed(run.pk_updates))
        runs["enqueue"].append(timed(run.enqueue))
        phase_runs.append({})
        runs["sweep"].append(run.sweep(phase_runs[-1]))
        if renewals and attempt == repeat - 1:
            say(f"{renewals} code renewals")
            renewal = run.renewal_sweep(renewals)
        reset(run.engine, database, size=size, due=due, renewals=renewals)
    run.close()
    run.check.verify()

    sweep_s = median(runs["sweep"])
    baseline_s = median(runs["pk_updates"])
    return {
        "contracts": size,
        "populate_s": populate_s,
        "sweep_s": sweep_s,
        "select_due_s": median(runs["select_due"]),
        "baseline_pk_updates_s": baseline_s,
        "enqueue_s": median(runs["enqueue"]),
        "sweep_vs_baseline": sweep_s / baseline_s,
        "runs_s": runs,
        "sweep_phases_s": {
            name: median([phases.get(name, 0.0) for phases in phase_runs])
            for name in ("claim", "enqueue", "redrive", "commits")
        },
        "due_query_plan": plan,
        "due_query_index": plan_index,
        "renewal": renewal,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def run_on(workbench: Workbench, kind: DatabaseKind, options: argparse.Namespace) -> dict[str, Any]:
    from workers.settings import get_settings

    sizes = sorted(set(options.sizes))
    if options.due < 1 or sizes[0] < options.due:
        raise SystemExit("--due must be at least 1 and at most the smallest size")
    print(f"  {kind}: warming up ...", flush=True)
    with workbench.database(kind, "sweep_warm_up") as database:
        # The first sweep of a process pays for imports, statement caches and
        # connection pools: a small untimed one keeps that out of the figures.
        measure_size(workbench, database, options, 2000, due=200, repeat=1, renewals=1, announce=False)
    figures: dict[str, Any] = {}
    for size in sizes:
        with workbench.database(kind, f"sweep_{size}") as database:
            figures[str(size)] = measure_size(
                workbench,
                database,
                options,
                size,
                due=options.due,
                repeat=options.repeat,
                renewals=options.renewals,
            )
    smallest, largest = figures[str(sizes[0])], figures[str(sizes[-1])]
    return {
        "database": kind,
        "due": options.due,
        "batch_size": options.batch_size or get_settings().reminder_batch_size,
        "repeat": options.repeat,
        "as_of": AS_OF.isoformat(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "sizes": figures,
        "growth": {
            name: largest[name] / smallest[name]
            for name in ("sweep_s", "select_due_s", "baseline_pk_updates_s", "enqueue_s")
        },
    }


def run(workbench: Workbench, options: argparse.Namespace, kinds: list[DatabaseKind]) -> dict[str, Any]:
    import actors  # noqa: F401 - sets up the broker from the workbench's settings

    return {kind: run_on(workbench, kind, options) for kind in kinds}


# -- the summary -------------------------------------------------------------------------


def _row(result: dict[str, Any], label: str, key: str, *, versus_baseline: bool = True) -> str:
    """One line of the summary table: the figure at each size, and how it grew."""
    cells = "".join(
        f"{against(size[key], size['baseline_pk_updates_s']) if versus_baseline else seconds(size[key]):>24}"
        for size in result["sizes"].values()
    )
    growth = result["growth"].get(key)
    return f"  {label:<32}{cells}{growth:>14.2f}" if growth else f"  {label:<32}{cells}"


def summary(figures: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for kind, result in figures.items():
        sizes = list(result["sizes"].values())
        due = result["due"]
        first, last = sizes[0], sizes[-1]
        lines.append(
            f"sweep on {kind}: {due:,} due reminders, batches of {result['batch_size']}, "
            f"median of {result['repeat']} run(s), load average {last['load_average'][0]}"
        )
        head = "".join(f"{size['contracts']:>24,}" for size in sizes)
        lines.append(f"  {'contracts in the table':<32}{head}{'growth':>14}")
        lines.append(_row(result, "sweep (claim, rows, enqueue)", "sweep_s"))
        lines.append(_row(result, "due query alone", "select_due_s"))
        lines.append(
            _row(result, f"base: {due:,} UPDATEs by key", "baseline_pk_updates_s", versus_baseline=False)
        )
        lines.append(_row(result, f"enqueue {due:,} messages", "enqueue_s"))
        for size in sizes:
            phases = size["sweep_phases_s"]
            lines.append(
                f"  {size['contracts']:,}: claims and rows {seconds(phases['claim'])}, enqueue "
                f"{seconds(phases['enqueue'])}, re-drive {seconds(phases['redrive'])}, commits "
                f"{seconds(phases['commits'])}; populated in {seconds(size['populate_s'])}"
            )
        for size in sizes:
            index = size["due_query_index"]
            plan_lines = [line.strip() for line in size["due_query_plan"] if index and index in line]
            used = f"through {index}" if index else f"NOT THROUGH AN INDEX ON {DUE_COLUMN}"
            lines.append(
                f"  {size['contracts']:,}: due query {used}: {(plan_lines or size['due_query_plan'])[0]}"
            )
        renewal = last.get("renewal") or {}
        if renewal:
            lines.append(
                f"  with code renewals ({renewal['renewals']} due with expired codes): "
                f"{renewal['per_contract_ms']:.1f} ms per reminder; one argon2id hash "
                f"({renewal['argon2id']}) {renewal['argon2id_hash_ms']:.1f} ms, "
                f"{renewal.get('hashing_threads', 1)} at a time; "
                f"{due:,} renewals would take ~{renewal['per_contract_ms'] * due / 1000:.0f} s"
            )
        lines.append(
            f"  => sweep {seconds(first['sweep_s'])} at {first['contracts']:,} contracts, "
            f"{seconds(last['sweep_s'])} at {last['contracts']:,}: ratio {result['growth']['sweep_s']:.2f} "
            f"(1.00 = cost follows the due contracts only); {last['sweep_vs_baseline']:.2f} x the baseline"
        )
    return lines
