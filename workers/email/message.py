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
    #: Text of this email that must appear nowhere else (its temporary password):
    #: a backend removes it from the provider's errors, which are recorded.
    secrets: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True, kw_only=True)
class Recipient:
    """One recipient of an ``OutgoingGroup``."""

    email: str
    name: str | None
    #: The recipient's delivery's idempotency key.
    reference: str
    #: Text replaced in this recipient's copy (placeholder: value), by the provider.
    substitutions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class OutgoingGroup:
    """One email sent to several recipients, each seeing only their own address.

    Sent by SendGrid as one request with one personalization per recipient.
    """

    recipients: tuple[Recipient, ...]
    from_email: str
    from_name: str | None
    subject: str
    text: str = field(repr=False)
    html: str = field(repr=False)
    kind: str

    def copies(self) -> list[OutgoingEmail]:
        """Each recipient's copy as its own email, substitutions applied (what they receive)."""
        return [
            OutgoingEmail(
                to_email=recipient.email,
                to_name=recipient.name,
                from_email=self.from_email,
                from_name=self.from_name,
                subject=_substitute(self.subject, recipient.substitutions),
                text=_substitute(self.text, recipient.substitutions),
                html=_substitute(self.html, recipient.substitutions),
                reference=recipient.reference,
                kind=self.kind,
            )
            for recipient in self.recipients
        ]


def _substitute(content: str, substitutions: dict[str, str]) -> str:
    for placeholder, value in substitutions.items():
        content = content.replace(placeholder, value)
    return content
