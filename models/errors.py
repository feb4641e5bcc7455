"""The service's exceptions: one shallow tree.

``PermanentError`` means retrying cannot help: the message fails at once and is
dead-lettered. ``TransientError`` means the same message may succeed later: it is
retried with backoff. Every refusal a producer can receive is a ``Rejected`` with a
stable ``code`` (the wire value) and a message a manager understands.
"""

from __future__ import annotations

from typing import ClassVar


class DispatchError(Exception):
    """Base class for every error this service raises on purpose."""


class PermanentError(DispatchError):
    """A failure that retrying the same message cannot fix."""


class TransientError(DispatchError):
    """A failure that may go away if the same message is retried later."""

    #: How long to wait before the retry, in milliseconds (None: the backoff decides).
    retry_after_ms: int | None = None


class Rejected(PermanentError):
    """A refusal with a stable error code, shown to the producer."""

    code: ClassVar[str] = "rejected"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_dict(self) -> dict[str, str]:
        """The ``{"code", "message"}`` object of the status and CLI outputs."""
        return {"code": self.code, "message": self.message}


class InvalidPayload(Rejected):
    """The message is not a valid object of the published wire contract."""

    code = "invalid_payload"


class InvalidEmail(Rejected):
    """An email address is not a valid address."""

    code = "invalid_email"


class InvalidCompanyName(Rejected):
    """A company legal name is empty, too long or contains control characters."""

    code = "invalid_company_name"


class InvalidLeadSource(Rejected):
    """The lead source is not one of bap, network or other."""

    code = "invalid_lead_source"


class EmailBoundToOtherCompany(Rejected):
    """The email address is already bound to a different company legal name."""

    code = "email_bound_to_other_company"


class UnknownWorkspace(Rejected):
    """The workspace has not been registered."""

    code = "unknown_workspace"


class ResourceGroupRequired(Rejected):
    """The workspace has several resource groups and none was given."""

    code = "resource_group_required"


class UnknownResourceGroup(Rejected):
    """The resource group does not belong to the workspace."""

    code = "unknown_resource_group"


class ContractConflict(Rejected):
    """A contract with this id already exists with different content."""

    code = "contract_conflict"


class UnknownContract(Rejected):
    """No contract has this id."""

    code = "unknown_contract"


class ContractNotSignable(Rejected):
    """The contract was rejected or cancelled, so it cannot be signed."""

    code = "contract_not_signable"


class ContractClosed(Rejected):
    """The contract is signed, cancelled or rejected: it cannot be cancelled or resent."""

    code = "contract_closed"


class SectionsNotAllAccepted(Rejected):
    """The client did not accept every section of the contract."""

    code = "sections_not_all_accepted"


class UnknownSection(Rejected):
    """An accepted section is not a section of the contract."""

    code = "unknown_section"


class RefusalsRateLimited(Rejected):
    """The workspace had too many sends refused lately: nothing is checked until the window ends."""

    code = "refusals_rate_limited"

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message)
        #: Whole seconds until the workspace's refusal window ends.
        self.retry_after_seconds = retry_after_seconds


class UnknownDelivery(PermanentError):
    """A deliver_email message names a delivery that does not exist."""


class DeliveryGroupMismatch(PermanentError):
    """A deliver_email_group message names deliveries of different contracts or kinds."""


class RenderError(PermanentError):
    """An email cannot be rendered safely (e.g. a header would hold a control character)."""


#: Provider refusals of the account (its key, its permissions), not of one email.
ACCOUNT_REFUSALS = frozenset({401, 403})


class ProviderRejected(PermanentError):
    """The email provider refused this email for good (HTTP 400, 401, 403, 413)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        #: The provider's HTTP status, when it answered one.
        self.status = status

    @property
    def refuses_account(self) -> bool:
        """Whether the refusal is of the account (bad key, no permission): every email gets it."""
        return self.status in ACCOUNT_REFUSALS


class ProviderUnavailable(TransientError):
    """The email provider failed or did not answer in time (5xx, timeout, connection)."""


class ProviderRateLimited(TransientError):
    """The email provider asked to slow down (HTTP 429) until its reset time."""

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class ContractNotReady(TransientError):
    """The contract's send_contract has not been processed yet."""


class DeliveryBusy(TransientError):
    """Another attempt holds this delivery's send lease."""

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class BrokerUnavailable(TransientError):
    """The message broker cannot be reached."""

    def __init__(self, message: str, *, maybe_sent: bool = False) -> None:
        super().__init__(message)
        #: The broker may have queued the messages anyway: its answer to them was lost.
        self.maybe_sent = maybe_sent


class DatabaseUnavailable(TransientError):
    """The database cannot be reached, or failed the statement for now."""


class ConfigurationError(DispatchError):
    """The settings cannot work (e.g. the SendGrid backend without an API key)."""


class DatabaseMissing(ConfigurationError):
    """A command that only reads was pointed at a SQLite file that does not exist."""


class AccessCodeNeeded(DispatchError):
    """The transaction needs an access code it was not given: hash one outside it, then run it again."""
