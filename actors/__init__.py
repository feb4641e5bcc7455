"""The Dramatiq actors, one module per job.

Importing this package sets up the broker from settings first, because Dramatiq
binds each actor to the global broker when it is declared. ``contract-dispatch
worker`` runs ``dramatiq actors``.
"""

from workers.broker import setup_broker

broker = setup_broker()

from actors.deliver_email import deliver_email  # noqa: E402
from actors.notify_signatories import notify_signatories  # noqa: E402
from actors.send_contract import send_contract  # noqa: E402

__all__ = ["broker", "deliver_email", "notify_signatories", "send_contract"]
