"""The published wire contract: one JSON object per message.

These models are the only definition of the public messages. Producers in any
language may enqueue them (see the README's wire format); ``contract-dispatch
schema`` exports them as JSON Schema. Validation normalises as it goes (trimmed,
NFC names; address domains in lower case), so a parsed message is ready for the
domain rules.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from models.account import COMPANY_NAME_MAX_LENGTH, EMAIL_MAX_LENGTH
from models.binding import normalize_company_name, normalize_email
from models.contract import LeadSource
from models.errors import (
    InvalidCompanyName,
    InvalidEmail,
    InvalidLeadSource,
    InvalidPayload,
    Rejected,
)
from models.text import IDENTIFIER_PATTERN, clean_text, is_identifier
from models.workspace import IDENTIFIER_MAX_LENGTH

#: Version of the wire contract; bumped on any incompatible change.
SCHEMA_VERSION: Literal[1] = 1

#: Longest free text (titles, display names), in characters.
TEXT_MAX_LENGTH = 200

#: The largest value of an SQL INTEGER column (32-bit on PostgreSQL): the largest row id.
SQL_INTEGER_MAX = 2**31 - 1

#: Bounds that keep one message small (it travels through Redis).
MAX_SIGNATORIES = 50
MAX_SECTIONS = 200

Identifier = Annotated[
    str,
    StringConstraints(
        strict=True, min_length=1, max_length=IDENTIFIER_MAX_LENGTH, pattern=IDENTIFIER_PATTERN
    ),
]

#: The queue of the scheduled jobs (reminder sweeps, housekeeping): none is in a hurry.
MAINTENANCE_QUEUE = "maintenance"

#: Length guards checked before a text is normalised (normalising may shorten it, so
#: the real limit is checked after), each with the limit it stands guard for: so
#: that work on a huge input stays bounded, while a refusal still names the real limit.
_LENGTH_GUARDS = {
    EMAIL_MAX_LENGTH + 64: EMAIL_MAX_LENGTH,
    COMPANY_NAME_MAX_LENGTH * 4: COMPANY_NAME_MAX_LENGTH,
    TEXT_MAX_LENGTH * 4: TEXT_MAX_LENGTH,
}

EmailAddress = Annotated[
    str,
    StringConstraints(strict=True, max_length=EMAIL_MAX_LENGTH + 64),
    AfterValidator(normalize_email),
    WithJsonSchema({"type": "string", "format": "email", "maxLength": EMAIL_MAX_LENGTH}),
]

CompanyName = Annotated[
    str,
    StringConstraints(strict=True, max_length=COMPANY_NAME_MAX_LENGTH * 4),
    AfterValidator(normalize_company_name),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": COMPANY_NAME_MAX_LENGTH,
            "description": "Company legal name; compared case-sensitively after trimming and NFC.",
        }
    ),
]


def _text(what: str) -> Any:
    return AfterValidator(lambda value: clean_text(value, max_length=TEXT_MAX_LENGTH, what=what))


Text = Annotated[
    str,
    StringConstraints(strict=True, max_length=TEXT_MAX_LENGTH * 4),
    _text("text"),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": TEXT_MAX_LENGTH}),
]

Locale = Literal["fr", "en"]


def _date_time_text(value: Any) -> Any:
    # pydantic would read a number as Unix time; the wire contract (the JSON Schema) says text.
    if isinstance(value, int | float):
        raise ValueError("must be an ISO 8601 date and time with its offset, e.g. 2024-07-01T08:30:00Z")
    return value


def _not_a_boolean(value: Any) -> Any:
    # True equals 1 in Python, so a Literal[1] would take it for the version.
    if isinstance(value, bool):
        raise ValueError("version must be the number 1, not a boolean")
    return value


class WireMessage(BaseModel):
    """Base of every message: strict about unknown fields, immutable once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The Dramatiq actor (and queue) a message of this type goes to.
    actor_name: ClassVar[str]
    queue_name: ClassVar[str]
    #: The actor (same job, lower priority) and queue that bulk producers use, if
    #: there are: a message sent alone is never queued behind an import, nor
    #: processed after the import messages a worker has already fetched.
    bulk_actor_name: ClassVar[str | None] = None
    bulk_queue_name: ClassVar[str | None] = None

    version: Annotated[
        Literal[1], BeforeValidator(_not_a_boolean), Field(description="Wire contract version.")
    ] = SCHEMA_VERSION

    def to_payload(self) -> dict[str, Any]:
        """The JSON object that is the message's only argument."""
        return self.model_dump(mode="json", exclude_none=True)


class Section(BaseModel):
    """One section of the contract; the client must accept each one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Identifier
    title: Text | None = None


class Signatory(BaseModel):
    """A manager who signs for the workspace and is told when the client signs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    email: EmailAddress
    name: Text | None = None


class SendContract(WireMessage):
    """Send a contract for signature to a client's email (queue ``contracts``; from a
    bulk producer, actor ``send_contract_bulk`` on queue ``contracts-bulk``)."""

    actor_name: ClassVar[str] = "send_contract"
    queue_name: ClassVar[str] = "contracts"
    bulk_actor_name: ClassVar[str] = "send_contract_bulk"
    bulk_queue_name: ClassVar[str] = "contracts-bulk"

    contract_id: Identifier
    email: EmailAddress
    company_name: CompanyName
    lead_source: LeadSource
    workspace_id: Identifier
    resource_group_id: Identifier | None = None
    signatories: list[Signatory] = Field(min_length=1, max_length=MAX_SIGNATORIES)
    sections: list[Section] = Field(min_length=1, max_length=MAX_SECTIONS)
    title: Text | None = None
    locale: Locale = "fr"

    @model_validator(mode="after")
    def _unique_ids(self) -> SendContract:
        section_ids = [section.id for section in self.sections]
        if len(set(section_ids)) != len(section_ids):
            raise ValueError("section ids must be unique")
        emails = [signatory.email for signatory in self.signatories]
        if len(set(emails)) != len(emails):
            raise ValueError("signatory emails must be unique")
        return self

    def content_hash(self) -> str:
        """SHA-256 of the canonical content: the same id with another hash is a conflict."""
        return self._content_digest

    @functools.cached_property
    def _content_digest(self) -> str:
        # Computed once: sending reads it up to three times per message (check,
        # batch bookkeeping, the recorded row), and the message is frozen.
        canonical = json.dumps(self.to_payload(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class NotifySignatories(WireMessage):
    """The client has signed: check every section was accepted, tell every signatory."""

    actor_name: ClassVar[str] = "notify_signatories"
    queue_name: ClassVar[str] = "contracts"

    contract_id: Identifier
    legal_name: CompanyName
    accepted_sections: list[Identifier] = Field(min_length=1, max_length=MAX_SECTIONS)
    registration_number: (
        Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9 .\-/]+$")] | None
    ) = None
    signer_name: Text | None = None
    signed_at: Annotated[AwareDatetime, BeforeValidator(_date_time_text)] | None = Field(
        default=None, description="When the client signed; the processing time if absent."
    )


class CancelContract(WireMessage):
    """Cancel a contract not signed yet: no more reminders, no pending email goes out."""

    actor_name: ClassVar[str] = "cancel_contract"
    queue_name: ClassVar[str] = "contracts"

    contract_id: Identifier
    reason: (
        Annotated[
            str,
            StringConstraints(strict=True, max_length=TEXT_MAX_LENGTH * 4),
            _text("reason"),
            WithJsonSchema({"type": "string", "minLength": 1, "maxLength": TEXT_MAX_LENGTH}),
        ]
        | None
    ) = None


class SweepReminders(WireMessage):
    """Run one reminder sweep (queue ``maintenance``; internal, sent by the scheduler)."""

    actor_name: ClassVar[str] = "sweep_reminders"
    queue_name: ClassVar[str] = MAINTENANCE_QUEUE

    as_of: AwareDatetime | None = Field(default=None, description="Act as if it were this time.")


class DeliverEmail(WireMessage):
    """Render and send one recorded email delivery (queue ``emails``; internal)."""

    actor_name: ClassVar[str] = "deliver_email"
    queue_name: ClassVar[str] = "emails"

    # Bounded by the id column (PostgreSQL's INTEGER is 32-bit): a larger id is a
    # malformed message, not a database error.
    delivery_id: int = Field(ge=1, le=SQL_INTEGER_MAX)


#: Most deliveries in one deliver_email_group message (SendGrid takes 1,000 personalizations per request).
GROUP_MAX_DELIVERIES = 1000


class DeliverEmailGroup(WireMessage):
    """Send several recorded deliveries of one event in one provider request (queue ``emails``; internal).

    One contract's signed notifications: one SendGrid request with one
    personalization per signatory, instead of one request each.
    """

    actor_name: ClassVar[str] = "deliver_email_group"
    queue_name: ClassVar[str] = "emails"

    delivery_ids: list[Annotated[int, Field(ge=1, le=SQL_INTEGER_MAX)]] = Field(
        min_length=1, max_length=GROUP_MAX_DELIVERIES
    )


def delivery_ids_of(actor_name: str, payload: Any) -> list[int]:
    """The deliveries a deliver_email or deliver_email_group payload names (none for other actors)."""
    if not isinstance(payload, dict):
        return []
    if actor_name == DeliverEmail.actor_name:
        named = [payload.get("delivery_id")]
    elif actor_name == DeliverEmailGroup.actor_name:
        listed = payload.get("delivery_ids")
        named = listed if isinstance(listed, list) else []
    else:
        return []
    # bool is an int too; a broken message names no delivery, nor one no id column
    # can hold (looked up, it would be a database error, not "no such delivery").
    return [
        value
        for value in named
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= SQL_INTEGER_MAX
    ]


PUBLIC_MESSAGES: tuple[type[WireMessage], ...] = (SendContract, NotifySignatories, CancelContract)

#: The actors of the scheduler's housekeeping jobs (queue ``maintenance``, no payload to check).
BROKER_MAINTENANCE_ACTOR = "broker_maintenance"
EXPIRE_ACCESS_CODES_ACTOR = "expire_access_codes"

M = TypeVar("M", bound=WireMessage)

#: Longest field path quoted in a refusal, in characters.
LOCATION_MAX_LENGTH = 80

#: Which rejection a validation error on a field becomes (the rest: invalid_payload).
_FIELD_CODES: dict[str, type[Rejected]] = {
    "email": InvalidEmail,
    "company_name": InvalidCompanyName,
    "legal_name": InvalidCompanyName,
    "lead_source": InvalidLeadSource,
}


def rejection_for(error: ValidationError) -> Rejected:
    """Turn a pydantic validation error into the named rejection of its first problem."""
    problems = error.errors(include_url=False, include_input=False)
    first = problems[0]
    location = [str(part) for part in first["loc"]]
    field = location[-1] if location and location[0] == "signatories" else (location[0] if location else "")
    # A missing field or a value of the wrong JSON type is a malformed message,
    # not a bad email or name: only a well-formed value gets the field's code.
    malformed = first["type"] == "missing" or first["type"].endswith("_type")
    rejection = InvalidPayload if malformed else _FIELD_CODES.get(field, InvalidPayload)
    where = ".".join(location) or "message"
    if len(where) > LOCATION_MAX_LENGTH or not where.isprintable():
        # An unknown field's name is the producer's text: quoted with its controls
        # escaped (the message is stored and printed; PostgreSQL refuses NUL) and cut short.
        where = repr(where[:LOCATION_MAX_LENGTH])
    # pydantic prefixes errors raised by our own validators with "Value error, ".
    message = first["msg"].removeprefix("Value error, ")
    if rejection is InvalidLeadSource:
        message = "lead source must be one of bap, network or other"
    elif first["type"] == "string_too_long":
        guard = int(first.get("ctx", {}).get("max_length", 0))
        message = f"String should have at most {_LENGTH_GUARDS.get(guard, guard)} characters"
    text = f"{where}: {message}"
    if len(problems) > 1:
        text += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return rejection(text)


def parse_message(model: type[M], payload: Any) -> M:
    """Validate one message payload, raising the matching ``Rejected`` on bad input."""
    if not isinstance(payload, dict):
        raise InvalidPayload(
            f"a {model.actor_name} message must be one JSON object, not {type(payload).__name__}"
        )
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise rejection_for(error) from None


def is_valid_identifier(value: Any) -> bool:
    """True if ``value`` is an id the service could have stored (``Identifier``)."""
    return isinstance(value, str) and 0 < len(value) <= IDENTIFIER_MAX_LENGTH and is_identifier(value)


class _ContractRef(BaseModel):
    contract_id: Identifier


def checked_contract_id(value: Any) -> str:
    """``value`` if it is a valid contract id, else the ``invalid_payload`` refusal a message gets."""
    try:
        return _ContractRef(contract_id=value).contract_id
    except ValidationError as error:
        raise rejection_for(error) from None


def contract_id_of(payload: Any) -> str | None:
    """The contract id of a message too broken to parse, if it holds a valid one."""
    candidate = payload.get("contract_id") if isinstance(payload, dict) else None
    return candidate if is_valid_identifier(candidate) else None


def json_schemas() -> dict[str, Any]:
    """The JSON Schema of every public message, keyed by actor name."""
    schemas: dict[str, Any] = {}
    for model in PUBLIC_MESSAGES:
        schema = model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"urn:contract-dispatch:{model.actor_name}:v{SCHEMA_VERSION}"
        schema["x-queue"] = model.queue_name
        if model.bulk_actor_name is not None:
            schema["x-bulk-actor"] = model.bulk_actor_name
            schema["x-bulk-queue"] = model.bulk_queue_name
        schema["x-actor"] = model.actor_name
        schemas[model.actor_name] = schema
    return schemas
