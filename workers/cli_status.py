"""``contract-dispatch status``: queues, workers and outcomes at a glance.

A table for people, one JSON object for machines (``--json``), a self-contained
HTML page with charts of the last hour (``--html FILE``), once or every
``--watch SECONDS`` until Ctrl-C. It only reads: one Lua script that reads
Redis, ``SELECT``s on the database, ``ZRANGE``/``HGETALL`` for the page's history.
It builds no broker (a plain Redis client reads), so it never enqueues, never
heartbeats and never registers as a worker.

Exit codes: 0 when every part was read; 3 when a part could not be read (Redis
or the database unreachable): what could be read is still shown, with the
errors. With ``--watch``, the code of the last refresh; 2 when the page cannot
be written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from workers.cli import EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE

#: The shortest ``--watch`` interval, in seconds.
MIN_WATCH_SECONDS = 0.2

#: Width of the table when stdout is not a terminal and ``COLUMNS`` is unset, in characters.
PIPE_WIDTH = 120


def _interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and seconds >= MIN_WATCH_SECONDS):
        raise argparse.ArgumentTypeError(f"must be at least {MIN_WATCH_SECONDS} seconds")
    return seconds


def add_commands(commands: Any) -> None:
    """Register ``status`` on the CLI's subcommands."""
    status = commands.add_parser(
        "status",
        help="queues, workers, emails, contracts, dead letters and the last reminder sweep (read-only)",
    )
    status.add_argument(
        "--json", action="store_true", help="one JSON object (with --watch: one line per refresh)"
    )
    status.add_argument(
        "--watch", type=_interval, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C"
    )
    status.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="write a self-contained HTML page with charts of the last hour (rewritten on each refresh)",
    )
    status.set_defaults(handler=cmd_status)


class _Reader:
    """Takes snapshots (and the page's history) with the process's settings."""

    def __init__(self, html: Path | None, refresh_seconds: float | None) -> None:
        from workers.settings import get_settings

        self.settings = get_settings()
        self.html = html
        self.refresh_seconds = refresh_seconds
        self._client: Any = None

    def client(self) -> Any:
        """One Redis client for every refresh (made on first use: it may fail, and be retried)."""
        from workers.broker import redis_client

        if self._client is None:
            self._client = redis_client(self.settings, start_embedded=False)
        return self._client

    def take(self) -> Any:
        from workers.ops.snapshot import take_snapshot

        try:
            client = self.client()
        except Exception:
            client = None  # take_snapshot tries again and reports why it failed
        snapshot = take_snapshot(client=client)
        if self.html is not None:
            self.write_page(snapshot)
        return snapshot

    def write_page(self, snapshot: Any) -> None:
        from workers.ops.history import read_history
        from workers.ops.page import render_page

        history = None
        try:
            history = read_history(self.client(), self.settings.redis_namespace, now=snapshot.taken_at)
        except Exception as exc:
            snapshot.errors.append(f"history: {type(exc).__name__}: {exc}")
        page = render_page(
            snapshot,
            history,
            namespace=self.settings.redis_namespace,
            sample_interval_ms=self.settings.history_sample_interval_ms,
            refresh_seconds=self.refresh_seconds,
        )
        assert self.html is not None
        # Written beside, then renamed: a browser reloading the page never sees half of it.
        partial = self.html.with_name(f".{self.html.name}.{os.getpid()}.partial")
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, self.html)


def _exit_code(snapshot: Any) -> int:
    return EXIT_UNAVAILABLE if snapshot.errors else EXIT_OK


def _console() -> Any:
    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
    console = Console(width=width, highlight=False)

    def closed() -> None:
        # Rich would exit 1 (not found, here): the CLI answers a closed stdout as for any command.
        raise BrokenPipeError

    console.on_broken_pipe = closed  # type: ignore[method-assign]
    return console


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_status(args: argparse.Namespace) -> int:
    if args.html is not None and not args.html.parent.is_dir():
        sys.stderr.write(f"cannot write {args.html}: no such directory\n")
        return EXIT_REFUSED
    reader = _Reader(args.html, args.watch)
    try:
        if args.watch is None:
            return _once(reader, args)
        # A stop by SIGTERM ends like Ctrl-C: the live display restores the terminal.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return _watch(reader, args)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise  # answered by the CLI, as for any command
        sys.stderr.write(f"cannot write {args.html}: {exc.strerror or exc}\n")
        return EXIT_REFUSED


def _once(reader: _Reader, args: argparse.Namespace) -> int:
    from workers.ops.table import render

    snapshot = reader.take()
    if args.json:
        sys.stdout.write(json.dumps(snapshot.as_dict(), ensure_ascii=False, indent=2, default=str) + "\n")
    elif args.html is not None:
        sys.stdout.write(f"{args.html.resolve()}\n")
    else:
        _console().print(render(snapshot))
    return _exit_code(snapshot)


def _watch(reader: _Reader, args: argparse.Namespace) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from workers.ops.table import render

    console = _console()
    footer = Text(f"refreshing every {args.watch:g} s · Ctrl-C to stop", style="dim")
    code = EXIT_OK
    live: Live | None = None
    if not args.json and args.html is None and console.is_terminal:
        live = Live(console=console, auto_refresh=False, transient=False)
    elif args.html is not None and not args.json:
        sys.stdout.write(f"{args.html.resolve()}\n")
        sys.stdout.flush()
    try:
        if live is not None:
            live.start()
        while True:
            started = time.monotonic()
            snapshot = reader.take()
            code = _exit_code(snapshot)
            if args.json:
                line = json.dumps(snapshot.as_dict(), ensure_ascii=False, separators=(",", ":"), default=str)
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            elif live is not None:
                live.update(Group(render(snapshot), footer), refresh=True)
            elif args.html is None:
                # Not a terminal: nothing to redraw in place, so one frame after another.
                console.print(render(snapshot))
                console.print()
                sys.stdout.flush()
            time.sleep(max(0.0, started + args.watch - time.monotonic()))
    except KeyboardInterrupt:
        return code
    finally:
        if live is not None:
            live.stop()
