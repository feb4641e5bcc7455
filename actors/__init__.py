"""The Dramatiq actors, one module per job.

Importing this package sets up the broker from settings first, because Dramatiq
binds each actor to the global broker when it is declared. ``contract-dispatch
worker`` runs ``dramatiq actors``.
"""

from workers.broker import setup_broker

broker = setup_broker()

from actors.cancel_contract import cancel_contract  # noqa: E402
from actors.deliver_email import deliver_email, deliver_email_group  # noqa: E402
from actors.housekeeping import broker_maintenance, expire_access_codes_job  # noqa: E402
from actors.notify_signatories import notify_signatories  # noqa: E402
from actors.send_contract import send_contract, send_contract_bulk  # noqa: E402
from actors.sweep_reminders import sweep_reminders  # noqa: E402

__all__ = [
    "broker",
    "broker_maintenance",
    "cancel_contract",
    "deliver_email",
    "deliver_email_group",
    "expire_access_codes_job",
    "notify_signatories",
    "send_contract",
    "send_contract_bulk",
    "sweep_reminders",
]
