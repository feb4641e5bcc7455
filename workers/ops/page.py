"""``contract-dispatch status --html FILE``: the snapshot as one self-contained HTML page.

The page holds the same figures as ``status --json`` (it is drawn from the same
snapshot, which it also embeds as a JSON data block), and two charts of the last
hour drawn as inline SVG from the history workers keep in Redis
(``workers.ops.history``): queue depth and messages processed per minute. No
script, no font, no image to fetch: it opens offline, and its
Content-Security-Policy forbids loading anything. Every name and error is
HTML-escaped. Each figure's cell carries ``data-figure`` (e.g.
``queues.emails.ready``), so a program can read the page too.
"""

from __future__ import annotations

import json
from datetime import timedelta
from html import escape
from typing import Any

from workers.ops.chart import ALARM, PALETTE, Series, line_chart
from workers.ops.formatting import (
    CONTRACT_STATUSES,
    email_kinds,
    format_age,
    format_count,
    format_time,
    known_sum,
    ordered,
)
from workers.ops.history import CHART_SPAN, History
from workers.ops.snapshot import CONSUMED_QUEUES_TEXT, QUEUE_STATES, QUEUES, WINDOWS, Snapshot
from workers.ops.table import SWEEP_FIELDS, TIME_FIELDS

#: The id of the embedded JSON data block (the snapshot, as ``status --json`` prints it).
DATA_BLOCK_ID = "snapshot-data"

STYLE = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 40px; font: 15px/1.45 system-ui, -apple-system, "Segoe UI",
  Roboto, "DejaVu Sans", sans-serif; color: #1d2430; background: #f3f5f8; }
header { display: flex; align-items: baseline; gap: 20px; flex-wrap: wrap; margin-bottom: 16px; }
h1 { font-size: 24px; margin: 0; }
h2 { font-size: 17px; margin: 0 0 10px; }
.meta { color: #4a5568; }
.cards { display: grid; grid-template-columns: repeat(6, 1fr); gap: 12px; margin-bottom: 18px; }
.card { background: #fff; border-radius: 8px; padding: 12px 14px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card .label { color: #4a5568; font-size: 13px; }
.card .value { font-size: 28px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card.alarm .value, .alarm { color: #b3261e; }
.ok { color: #1b7f3b; }
section.panel { background: #fff; border-radius: 8px; padding: 14px 16px; margin-bottom: 16px;
  box-shadow: 0 1px 2px rgba(0,0,0,.08); overflow-x: auto; }
.columns { display: grid; grid-template-columns: 1fr 1fr 1.4fr; gap: 16px; align-items: start; }
.columns section.panel { margin-bottom: 0; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.charts section.panel { padding: 10px 8px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e3e7ee; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td.name { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
td.wrap { white-space: normal; text-align: left; word-break: break-word; }
th { color: #4a5568; font-weight: 600; font-size: 13px; }
.errors { background: #fdecea; border: 1px solid #f5c2bd; color: #8c1d18; }
.errors li { font-family: ui-monospace, monospace; font-size: 13px; }
svg.chart { display: block; max-width: 100%; height: auto; }
svg .grid { stroke: #e3e7ee; stroke-width: 1; }
svg .axis { stroke: #4a5568; stroke-width: 1; }
svg .tick, svg .legend { font: 12px system-ui, sans-serif; fill: #1d2430; }
svg .axis-label { font: 12px system-ui, sans-serif; fill: #4a5568; }
svg .chart-title { font: 600 15px system-ui, sans-serif; fill: #1d2430; }
svg .empty { font: 14px system-ui, sans-serif; fill: #4a5568; }
footer { color: #4a5568; font-size: 13px; margin-top: 20px; }
"""


def _cell(value: Any, figure: str | None = None, *, css: str = "") -> str:
    attributes = f' data-figure="{escape(figure)}"' if figure else ""
    if css:
        attributes += f' class="{escape(css)}"'
    return f"<td{attributes}>{escape(str(value))}</td>"


def _table(table_id: str, headers: list[str], rows: list[str]) -> str:
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    body = "".join(rows) or f'<tr><td colspan="{len(headers)}">none</td></tr>'
    return f'<table id="{escape(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _card(label: str, value: Any, figure: str, *, alarm: bool = False) -> str:
    css = "card alarm" if alarm else "card"
    return (
        f'<div class="{css}"><div class="label">{escape(label)}</div>'
        f'<div class="value" data-figure="{escape(figure)}">{escape(str(value))}</div></div>'
    )


def _data_block(data: dict[str, Any]) -> str:
    # "<", ">" and "&" as JSON escapes: no text in the data can close the element.
    text = json.dumps(data, ensure_ascii=False, default=str)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{DATA_BLOCK_ID}">{text}</script>'


def depth_chart(snapshot: Snapshot, history: History, *, sample_interval_ms: int) -> str:
    """Per queue, messages not done yet (ready + delayed + in flight), then the snapshot itself.

    Where the broker does not count messages in flight (RabbitMQ), a point is
    what waits on the queues (ready + delayed) and says so.
    """
    names = ordered(QUEUES, (name for sample in history.depth for name in sample.queues))
    now_figures = {
        queue.name: {state: getattr(queue, state) for state in QUEUE_STATES} for queue in snapshot.queues
    }
    samples = [(sample.at, sample.queues, "") for sample in history.depth]
    samples.append((snapshot.taken_at, now_figures, " (this snapshot)"))
    series = []
    for index, name in enumerate(names):
        line = Series(name=name, color=PALETTE[index % len(PALETTE)])
        for at, queues, note in samples:
            figures = queues.get(name)
            if figures is None:
                continue
            in_flight = figures["in_flight"]
            waiting = (figures["ready"] or 0) + (figures["delayed"] or 0)
            pending = waiting + (in_flight or 0)
            what = "not done" if in_flight is not None else "waiting, in flight not counted"
            line.points.append(
                (
                    at,
                    float(pending),
                    f"{name} at {format_time(at)} UTC{note}: {pending} {what} "
                    f"({figures['ready']} ready, {figures['delayed']} delayed, "
                    f"{format_count(in_flight)} in flight); {figures['dead']} dead",
                )
            )
        series.append(line)
    return line_chart(
        chart_id="chart-depth",
        title="Queue depth: messages ready, delayed or in flight",
        y_label="messages",
        series=series,
        start=history.since,
        end=history.until,
        max_gap=timedelta(milliseconds=max(3 * sample_interval_ms, 60_000)),
        empty_text="No depth sample in the last hour",
    )


def throughput_chart(history: History) -> str:
    """Per queue, messages processed per minute (every outcome); and dead-lettered, all queues."""
    names = ordered(QUEUES, (name for minute in history.throughput for name in minute.queues))
    series = [Series(name=name, color=PALETTE[index % len(PALETTE)]) for index, name in enumerate(names)]
    failed = Series(name="dead-lettered (all queues)", color=ALARM, dashed=True)
    last = history.throughput[-1].minute if history.throughput else None
    for minute in history.throughput:
        middle = minute.minute + timedelta(seconds=30)
        note = " (minute in progress)" if minute.minute == last else ""
        for line in series:
            outcomes = minute.queues.get(line.name, {})
            total = sum(outcomes.values())
            detail = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items())) or "none"
            line.points.append(
                (
                    middle,
                    float(total),
                    f"{line.name}, minute {format_time(minute.minute)[11:16]} UTC{note}: "
                    f"{total} processed ({detail})",
                )
            )
        dead = sum(outcomes.get("failed", 0) for outcomes in minute.queues.values())
        failed.points.append(
            (
                middle,
                float(dead),
                f"minute {format_time(minute.minute)[11:16]} UTC{note}: {dead} dead-lettered",
            )
        )
    return line_chart(
        chart_id="chart-throughput",
        title="Throughput: messages processed per minute",
        y_label="messages per minute",
        series=[*series, failed],
        start=history.since,
        end=history.until,
        max_gap=timedelta(seconds=90),
        empty_text="No message counts in the last hour",
    )


def render_page(
    snapshot: Snapshot,
    history: History | None,
    *,
    namespace: str,
    sample_interval_ms: int,
    refresh_seconds: float | None = None,
) -> str:
    """The whole page; ``refresh_seconds`` makes the browser reload it (``--watch``)."""
    data = snapshot.as_dict()
    errors = list(snapshot.errors)
    if history is None:
        history = History(since=snapshot.taken_at - CHART_SPAN, until=snapshot.taken_at)
    taken = format_time(snapshot.taken_at)
    queues = snapshot.queues
    on_rabbitmq = snapshot.broker == "rabbitmq"
    live = snapshot.live_workers
    live_label = (
        "live workers (consumers on RabbitMQ)"
        if on_rabbitmq
        else f"live workers ({len(snapshot.workers)} registered)"
    )
    sent_hour = sum(counts.get("sent", 0) for counts in snapshot.emails.get("last_hour", {}).values())
    failed_hour = sum(counts.get("failed", 0) for counts in snapshot.emails.get("last_hour", {}).values())
    cards = "".join(
        [
            _card(live_label, live, "live_workers", alarm=live == 0),
            _card("ready, all queues", sum(q.ready for q in queues), "total.ready"),
            _card("delayed, all queues", sum(q.delayed for q in queues), "total.delayed"),
            _card(
                "in flight, all queues",
                format_count(known_sum(q.in_flight for q in queues)),
                "total.in_flight",
            ),
            _card(
                "dead, all queues",
                sum(q.dead for q in queues),
                "total.dead",
                alarm=any(q.dead for q in queues),
            ),
            _card(
                "emails sent / failed, 1 h",
                f"{sent_hour} / {failed_hour}",
                "total.emails_last_hour",
                alarm=failed_hour > 0,
            ),
        ]
    )

    queue_rows = [
        f'<tr data-queue="{escape(q.name)}">'
        + _cell(q.name, css="name")
        + _cell(q.ready, f"queues.{q.name}.ready")
        + _cell(q.delayed, f"queues.{q.name}.delayed")
        + _cell(format_count(q.in_flight), f"queues.{q.name}.in_flight")
        + _cell(q.dead, f"queues.{q.name}.dead", css="alarm" if q.dead else "")
        + _cell(format_age(q.oldest_ready_age_seconds), f"queues.{q.name}.oldest_ready_age")
        + (_cell(format_count(q.consumers), f"queues.{q.name}.consumers") if on_rabbitmq else "")
        + "</tr>"
        for q in queues
    ]
    worker_rows = [
        f'<tr data-worker="{escape(w.worker_id)}">'
        + _cell(w.worker_id, css="name")
        + _cell(w.host, f"workers.{w.worker_id}.host")
        + _cell(w.pid if w.pid is not None else "-", f"workers.{w.worker_id}.pid")
        + _cell(format_time(w.last_heartbeat), f"workers.{w.worker_id}.last_heartbeat")
        + _cell(format_age(w.silent_seconds), f"workers.{w.worker_id}.silent")
        + _cell(
            "alive" if w.alive else "dead", f"workers.{w.worker_id}.state", css="ok" if w.alive else "alarm"
        )
        + "</tr>"
        for w in snapshot.workers
    ]
    email_rows = []
    for kind in email_kinds(snapshot.emails):
        cells = _cell(kind, css="name")
        for window in WINDOWS:
            outcomes = snapshot.emails.get(window, {}).get(kind, {})
            cells += _cell(outcomes.get("sent", 0), f"emails.{window}.{kind}.sent")
            failed = outcomes.get("failed", 0)
            cells += _cell(failed, f"emails.{window}.{kind}.failed", css="alarm" if failed else "")
        email_rows.append(f"<tr>{cells}</tr>")
    contract_rows = [
        "<tr>"
        + _cell(status, css="name")
        + _cell(snapshot.contracts.get(status, 0), f"contracts.{status}")
        + "</tr>"
        for status in ordered(CONTRACT_STATUSES, snapshot.contracts)
    ]
    dead_rows = [
        "<tr>"
        + _cell(actor, css="name")
        + _cell(snapshot.dead_letters[actor], f"dead_letters.{actor}", css="alarm")
        + "</tr>"
        for actor in sorted(snapshot.dead_letters)
    ]
    sweep = snapshot.last_sweep
    if sweep is None:
        sweep_html = "<p>No reminder sweep recorded.</p>"
    else:
        sweep_rows = [
            "<tr>"
            + f'<th scope="row">{escape(label)}</th>'
            + _cell(
                format_time(sweep.get(key)) if key in TIME_FIELDS else sweep.get(key),
                f"last_sweep.{key}",
            )
            + "</tr>"
            for key, label in SWEEP_FIELDS
        ]
        if sweep.get("error"):
            result = _cell(f"error: {sweep['error']}", "last_sweep.result", css="wrap alarm")
        elif sweep.get("finished_at") is None:
            result = _cell("not finished (running, or stopped midway)", "last_sweep.result", css="wrap")
        else:
            result = _cell("ok", "last_sweep.result", css="wrap ok")
        sweep_rows.append(f'<tr><th scope="row">result</th>{result}</tr>')
        sweep_html = f'<table id="last-sweep"><tbody>{"".join(sweep_rows)}</tbody></table>'

    window_headers = [
        f"{outcome} ({window.replace('_', ' ')})" for window in WINDOWS for outcome in ("sent", "failed")
    ]
    error_html = ""
    if errors:
        items = "".join(f"<li>{escape(error)}</li>" for error in errors)
        error_html = (
            f'<section class="panel errors" id="errors"><h2>Could not read</h2><ul>{items}</ul></section>'
        )
    refresh = (
        f'<meta http-equiv="refresh" content="{max(1, round(refresh_seconds))}">' if refresh_seconds else ""
    )
    interval_s = sample_interval_ms / 1000
    moment = escape(snapshot.taken_at.isoformat())
    taken_at = f'<time datetime="{moment}" data-figure="taken_at">{escape(taken)}</time>'
    depth = depth_chart(snapshot, history, sample_interval_ms=sample_interval_ms)
    queue_headers = ["queue", "ready", "delayed", "in flight", "dead", "oldest ready"]
    queues_table = _table("queues", queue_headers + (["consumers"] if on_rabbitmq else []), queue_rows)
    if on_rabbitmq and not snapshot.workers:
        workers_table = (
            f'<p id="workers">None registered in Redis; {live} live, by their consumers on '
            f"{CONSUMED_QUEUES_TEXT} (see the queue table).</p>"
        )
    else:
        workers_table = _table(
            "workers", ["worker", "host", "pid", "last heartbeat (UTC)", "silent for", "state"], worker_rows
        )
    contracts_table = _table("contracts", ["status", "contracts"], contract_rows)
    dead_table = _table("dead-letters", ["actor", "dead letters"], dead_rows)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
{refresh}
<title>contract-dispatch status, {escape(taken)} UTC</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>contract-dispatch status</h1>
<span class="meta">taken at {taken_at} UTC
 · namespace <code>{escape(namespace)}</code></span>
</header>
{error_html}
<div class="cards">{cards}</div>
<div class="charts">
<section class="panel" id="depth">{depth}</section>
<section class="panel" id="throughput">{throughput_chart(history)}</section>
</div>
<section class="panel"><h2>Queues</h2>
{queues_table}
</section>
<section class="panel"><h2>Workers</h2>
{workers_table}
</section>
<section class="panel"><h2>Emails</h2>{_table("emails", ["kind", *window_headers], email_rows)}</section>
<div class="columns">
<section class="panel"><h2>Contracts</h2>{contracts_table}</section>
<section class="panel"><h2>Dead letters</h2>{dead_table}</section>
<section class="panel"><h2>Last reminder sweep</h2>{sweep_html}</section>
</div>
<footer>
<p>Ready: waiting on its queue. Delayed: waiting for a retry's time. In flight: fetched by a worker,
not acknowledged yet. Dead: in Dramatiq's dead-letter queue; dead letters by actor come from the
<code>dead_letters</code> table. On RabbitMQ, n/a: plain AMQP does not count messages in flight (a retry a
worker holds until its time is among them) nor tell the oldest message's age.
Emails are counted by when they were sent (sent) or last failed (failed).
Workers record a depth sample every {interval_s:g} s and count messages per minute;
the chart shows the last hour (on RabbitMQ, depth is what waits: ready and delayed).</p>
</footer>
{_data_block(data)}
</body>
</html>
"""
