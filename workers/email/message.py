"""One rendered email, ready for a backend."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class OutgoingEmail:
    """Addresses and display names stay separate fields all the way to the provider."""

    to_email: str
    to_name: str | None
    from_email: str
    from_name: str | None
    subject: str
    text: str = field(repr=False)
    html: str = field(repr=False)
    #: The delivery's idempotency key, sent along as a custom argument for tracing.
    reference: str
    #: The email kind (a category at the provider).
    kind: str
