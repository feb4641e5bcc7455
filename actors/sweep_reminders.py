"""sweep_reminders: remind clients who have not signed (queue ``maintenance``)."""

from __future__ import annotations

from typing import Any

import dramatiq

from models.messages import SweepReminders, parse_message
from workers.reminders import run_sweep
from workers.retry_policy import actor_options


@dramatiq.actor(
    actor_name=SweepReminders.actor_name,
    queue_name=SweepReminders.queue_name,
    **actor_options(SweepReminders.actor_name),
)
def sweep_reminders(payload: dict[str, Any]) -> None:
    """Sent by the scheduler; a sweep sends each due reminder once, however many run."""
    message = parse_message(SweepReminders, payload)
    run_sweep(as_of=message.as_of)
