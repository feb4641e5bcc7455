"""One structured log line per message processed.

Each line carries the message id, actor, queue, contract id, outcome (``done``,
``retry``, ``failed`` or ``skipped``), duration in milliseconds and attempt
number; never the payload, so never an access code, a key or an email body.
With ``LOG_FORMAT=json`` each line is one JSON object.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import dramatiq

from models.messages import contract_id_of
from workers.dead_letters import ATTEMPTS_OPTION
from workers.logs import apply_log_format
from workers.ops.history import ThroughputCounter
from workers.retry_policy import underlying
from workers.settings import get_settings

#: The logger of these lines (configure it to ship them elsewhere).
LOGGER_NAME = "contract_dispatch.messages"

logger = logging.getLogger(LOGGER_NAME)

#: What the actor running in this worker thread learnt about its message.
_context = threading.local()


def note_contract_id(contract_id: str | None) -> None:
    """Name the contract of the message this thread is processing, for its log line.

    For messages whose payload carries no contract id (``deliver_email`` names a
    delivery): the actor calls this once it has read which contract that is.
    Dramatiq runs an actor and its middleware hooks in the same worker thread.
    """
    _context.contract_id = contract_id


class MessageLog(dramatiq.Middleware):
    """Logs each processed message once its fate is known.

    Placed before ``Retries`` in the middleware list, so that its "after" hook
    runs after Retries has decided between a retry and a dead letter.
    """

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        #: Messages processed per minute, queue and outcome, for the status history: counted
        #: here in memory, added to Redis by the maintenance tick (no Redis call per message).
        self.throughput = ThroughputCounter()

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        # Dramatiq's CLI configured logging in this worker process: apply LOG_FORMAT to it.
        apply_log_format(get_settings().log_format)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        _context.contract_id = None
        self._started[message.message_id] = time.monotonic()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if exception is None:
            outcome = "done"
        elif message.failed:
            outcome = "failed"
        else:
            outcome = "retry"
        self._log(message, outcome, exception)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._log(message, "skipped", None)

    def _log(self, message: Any, outcome: str, exception: BaseException | None) -> None:
        self.throughput.add(message.queue_name, outcome)
        started = self._started.pop(message.message_id, None)
        duration_ms = round((time.monotonic() - started) * 1000, 1) if started is not None else None
        args = message.args
        noted, _context.contract_id = getattr(_context, "contract_id", None), None
        fields = {
            "message_id": message.message_id,
            "actor": message.actor_name,
            "queue": message.queue_name,
            "contract_id": (contract_id_of(args[0]) if args else None) or noted,
            "outcome": outcome,
            "duration_ms": duration_ms,
            # Failed attempts so far, counted by DeadLetters (whose hook ran first).
            "attempt": int(message.options.get(ATTEMPTS_OPTION) or 0) + (exception is None),
        }
        if exception is not None:
            fields["error"] = type(underlying(exception)).__name__
        level = logging.WARNING if outcome == "failed" else logging.INFO
        text = " ".join(f"{name}={value}" for name, value in fields.items() if value is not None)
        logger.log(level, "%s", text, extra={"fields": fields})
