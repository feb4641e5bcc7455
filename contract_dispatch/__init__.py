"""contract-dispatch's Python producer API.

>>> from contract_dispatch import send_contract
>>> send_contract(contract_id="C-1", email="client@example.com", ...)  # doctest: +SKIP
Receipt(contract_id='C-1', status='queued')
"""

from contract_dispatch.producer import (
    Receipt,
    ResendReceipt,
    cancel_contract,
    contract_status,
    notify_signatories,
    resend_invitation,
    run_reminders,
    send_contract,
    set_workspace,
    submit_notify_signatories,
    submit_send_contract,
)
from models.errors import BrokerUnavailable, DispatchError, Rejected
from models.status import ContractReport

__all__ = [
    "BrokerUnavailable",
    "ContractReport",
    "DispatchError",
    "Receipt",
    "Rejected",
    "ResendReceipt",
    "cancel_contract",
    "contract_status",
    "notify_signatories",
    "resend_invitation",
    "run_reminders",
    "send_contract",
    "set_workspace",
    "submit_notify_signatories",
    "submit_send_contract",
]
