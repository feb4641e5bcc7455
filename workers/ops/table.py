"""The status snapshot as rich tables, for people at a terminal.

Every name that comes from Redis or the database (worker ids, hosts, actors,
errors) is given to rich as plain ``Text``, never as markup, so a ``[`` in an
actor name prints as itself.
"""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from workers.ops.formatting import (
    CONTRACT_STATUSES,
    email_kinds,
    format_age,
    format_count,
    format_time,
    ordered,
)
from workers.ops.snapshot import CONSUMED_QUEUES_TEXT, WINDOWS, Snapshot

#: Columns of the last sweep's table: (key in ``last_sweep``, label).
SWEEP_FIELDS = (
    ("started_at", "started"),
    ("as_of", "as of"),
    ("finished_at", "finished"),
    ("claimed", "claimed"),
    ("postponed", "postponed"),
    ("lost_races", "lost races"),
    ("codes_renewed", "codes renewed"),
    ("redriven", "redriven"),
)

#: The sweep's fields that are moments.
TIME_FIELDS = ("started_at", "as_of", "finished_at")


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=True)
    return table


def _count(value: int | None, *, alarm: bool = False) -> Text:
    return Text(format_count(value), style="bold red" if alarm and value else "")


def render(snapshot: Snapshot) -> RenderableType:
    """Header, then queues, workers, emails, contracts, dead letters, last sweep and errors."""
    parts: list[RenderableType] = []
    live = snapshot.live_workers
    header = Text.assemble(
        ("contract-dispatch status", "bold"),
        f"  taken at {format_time(snapshot.taken_at)} UTC  ·  ",
        (f"{live} live worker{'s' if live != 1 else ''}", "green" if live else "bold red"),
    )
    parts.append(header)

    on_rabbitmq = snapshot.broker == "rabbitmq"
    columns = ["queue", "ready", "delayed", "in flight", "dead", "oldest ready"]
    queues = _table("Queues", *columns, *(["consumers"] if on_rabbitmq else []))
    for queue in snapshot.queues:
        cells: list[Text | str] = [
            Text(queue.name),
            _count(queue.ready),
            _count(queue.delayed),
            _count(queue.in_flight),
            _count(queue.dead, alarm=True),
            format_age(queue.oldest_ready_age_seconds),
        ]
        if on_rabbitmq:
            cells.append(_count(queue.consumers))
        queues.add_row(*cells)
    parts.append(queues)

    workers = _table("Workers", "worker", "host", "pid", "last heartbeat (UTC)", "silent for", "state")
    for worker in snapshot.workers:
        workers.add_row(
            Text(worker.worker_id),
            Text(worker.host),
            str(worker.pid) if worker.pid is not None else "-",
            format_time(worker.last_heartbeat),
            format_age(worker.silent_seconds),
            Text("alive", style="green") if worker.alive else Text("dead", style="bold red"),
        )
    if snapshot.workers:
        parts.append(workers)
    elif on_rabbitmq:
        parts.append(
            Text(
                f"Workers: none registered in Redis; {live} live, "
                f"by their consumers on {CONSUMED_QUEUES_TEXT}",
                style="" if live else "bold red",
            )
        )
    else:
        parts.append(Text("Workers: none registered", style="bold red"))

    columns = [
        f"{outcome} ({window.replace('_', ' ')})" for window in WINDOWS for outcome in ("sent", "failed")
    ]
    emails = _table("Emails", "kind", *columns)
    for kind in email_kinds(snapshot.emails):
        row: list[Text] = []
        for window in WINDOWS:
            outcomes = snapshot.emails.get(window, {}).get(kind, {})
            row += [_count(outcomes.get("sent", 0)), _count(outcomes.get("failed", 0), alarm=True)]
        emails.add_row(Text(kind), *row)
    parts.append(emails)

    contracts = _table("Contracts", "status", "contracts")
    for status in ordered(CONTRACT_STATUSES, snapshot.contracts):
        contracts.add_row(Text(status), _count(snapshot.contracts.get(status, 0)))
    parts.append(contracts)

    if snapshot.dead_letters:
        dead = _table("Dead letters", "actor", "dead letters")
        for actor in sorted(snapshot.dead_letters):
            dead.add_row(Text(actor), _count(snapshot.dead_letters[actor], alarm=True))
        parts.append(dead)
    else:
        parts.append(Text("Dead letters: none", style="bold"))

    sweep = snapshot.last_sweep
    if sweep is None:
        parts.append(Text("Last reminder sweep: none recorded", style="bold"))
    else:
        table = _table("Last reminder sweep", "", "")
        table.show_header = False
        for key, label in SWEEP_FIELDS:
            value = sweep.get(key)
            table.add_row(label, format_time(value) if key in TIME_FIELDS else Text(str(value)))
        if sweep.get("error"):
            result = Text(f"error: {sweep['error']}", style="bold red")
        elif sweep.get("finished_at") is None:
            result = Text("not finished (running, or stopped midway)", style="yellow")
        else:
            result = Text("ok", style="green")
        table.columns[1].no_wrap = False
        table.columns[1].justify = "left"
        table.add_row("result", result)
        parts.append(table)

    if snapshot.errors:
        parts.append(Text("Could not read:", style="bold red"))
        parts.extend(Text(f"  {error}", style="red") for error in snapshot.errors)
    return Group(*parts)
