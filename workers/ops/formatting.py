"""How the status table and page write durations and times (the same on both)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

#: Email kinds shown even when none was sent or failed, in this order.
EMAIL_KINDS = ("invitation", "reminder", "signed_notification")

#: Contract statuses shown even when no contract has them, in this order.
CONTRACT_STATUSES = ("queued", "sent", "signed", "rejected", "cancelled")


#: How a figure the broker does not tell is shown (RabbitMQ's messages in flight).
NOT_TOLD = "n/a"


def format_count(value: int | None) -> str:
    """A count, or ``n/a`` where the broker does not tell it."""
    return NOT_TOLD if value is None else str(value)


def known_sum(values: Iterable[int | None]) -> int | None:
    """The sum of counts, or None when any of them is not told."""
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


def format_age(seconds: float | None) -> str:
    """``12.4 s``, ``3 min 20 s``, ``2 h 05 min``, ``3 d 04 h``; ``-`` for none."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def format_time(moment: datetime | str | None) -> str:
    """A moment in UTC, to the second: ``2026-11-29 00:31:15``; ``-`` for none."""
    if moment is None:
        return "-"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def ordered(known: tuple[str, ...], found: Iterable[str]) -> list[str]:
    """The ``known`` names first, in their order, then any other found name, sorted."""
    return [*known, *sorted({name for name in found if name not in known})]


def email_kinds(emails: Mapping[str, Mapping[str, object]]) -> list[str]:
    """Every email kind of a snapshot's ``emails`` ({window: {kind: ...}}), known ones first."""
    return ordered(EMAIL_KINDS, (kind for counts in emails.values() for kind in counts))
