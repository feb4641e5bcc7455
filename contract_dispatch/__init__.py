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
    contract_statuses,
    notify_signatories,
    resend_invitation,
    run_reminders,
    send_contract,
    send_contracts,
    set_workspace,
    submit_notify_signatories,
    submit_send_contract,
    submit_send_contracts,
    workspaces,
)
from contract_dispatch.reports import lead_source_report, reported_contracts
from models.errors import BrokerUnavailable, DatabaseUnavailable, DispatchError, Rejected, TransientError
from models.first_login import AccessCodeRefused, PasswordRefused
from models.messages import NotifySignatories, SendContract, parse_message
from models.reporting import LeadSourceCounts, LeadSourceReport, ReportedContract
from models.status import ContractReport

__all__ = [
    "AccessCodeRefused",
    "BrokerUnavailable",
    "ContractReport",
    "DatabaseUnavailable",
    "DispatchError",
    "LeadSourceCounts",
    "LeadSourceReport",
    "NotifySignatories",
    "PasswordRefused",
    "Receipt",
    "Rejected",
    "ReportedContract",
    "ResendReceipt",
    "SendContract",
    "TransientError",
    "cancel_contract",
    "contract_status",
    "contract_statuses",
    "lead_source_report",
    "notify_signatories",
    "parse_message",
    "reported_contracts",
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
    "workspaces",
]
