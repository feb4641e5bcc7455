"""Service behaviour added through Dramatiq's middleware hooks."""

from workers.middleware.dead_letters import DeadLetters
from workers.middleware.hashing import HashingThreads
from workers.middleware.maintenance import BrokerMaintenance
from workers.middleware.message_log import MessageLog
from workers.middleware.shutdown import SingleStopSignal
from workers.middleware.templates import Templates

__all__ = [
    "BrokerMaintenance",
    "DeadLetters",
    "HashingThreads",
    "MessageLog",
    "SingleStopSignal",
    "Templates",
]
