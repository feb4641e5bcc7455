"""``contract-dispatch metrics``: one Prometheus scrape, printed."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from workers.cli import EXIT_OK, EXIT_UNAVAILABLE


def cmd_metrics(args: argparse.Namespace) -> int:
    """What the worker's endpoint serves: METRICS_DIR's counters plus gauges read now."""
    from workers.ops.exporter import render, scrape_registry
    from workers.ops.snapshot import take_snapshot
    from workers.settings import get_settings

    directory = get_settings().effective_metrics_dir
    snapshot = take_snapshot()
    sys.stdout.write(render(scrape_registry(directory, take=lambda: snapshot)))
    if not directory.is_dir():
        sys.stderr.write(f"note: no worker metric files in {directory} (METRICS_DIR): gauges only\n")
    for error in snapshot.errors:
        sys.stderr.write(f"unavailable: {error}\n")
    return EXIT_UNAVAILABLE if snapshot.errors else EXIT_OK


def add_commands(commands: Any) -> None:
    """Register ``metrics``."""
    metrics = commands.add_parser(
        "metrics", help="print one Prometheus scrape (worker counters and gauges read now)"
    )
    metrics.set_defaults(handler=cmd_metrics)
