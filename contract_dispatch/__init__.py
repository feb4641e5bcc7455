"""contract-dispatch's Python producer API.

>>> from contract_dispatch import send_contract
>>> send_contract(contract_id="C-1", email="client@example.com", ...)  # doctest: +SKIP
Receipt(contract_id='C-1', status='queued')
"""

from contract_dispatch.accounts import set_password, verify_code, verify_password
from contract_dispatch.producer import (
    Receipt,
    ResendReceipt,
    cancel_contract,
    contract_status,
    notify_signatories,
    resend_invitation,
    run_reminders,
    send_contract,
    send_contracts,
    set_workspace,
    submit_notify_signatories,
    submit_send_contract,
    submit_send_contracts,
)
from models.errors import BrokerUnavailable, DatabaseUnavailable, DispatchError, Rejected
from models.first_login import AccessCodeRefused, PasswordRefused
from models.status import ContractReport

__all__ = [
    "AccessCodeRefused",
    "BrokerUnavailable",
    "ContractReport",
    "DatabaseUnavailable",
    "DispatchError",
    "PasswordRefused",
    "Receipt",
    "Rejected",
    "ResendReceipt",
    "cancel_contract",
    "contract_status",
    "notify_signatories",
    "resend_invitation",
    "run_reminders",
    "send_contract",
    "send_contracts",
    "set_password",
    "set_workspace",
    "submit_notify_signatories",
    "submit_send_contract",
    "submit_send_contracts",
    "verify_code",
    "verify_password",
]
