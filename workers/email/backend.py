"""The email backend interface and the factory that picks one from settings."""

from __future__ import annotations

from typing import Protocol, TypeGuard

from workers.email.message import OutgoingEmail, OutgoingGroup
from workers.settings import Settings


class EmailBackend(Protocol):
    """Sends one email; returns the provider's message id.

    Raises ``ProviderRejected`` when the email can never be sent, and a
    ``TransientError`` when trying again later may work.
    """

    name: str

    def send(self, email: OutgoingEmail) -> str: ...


class GroupBackend(EmailBackend, Protocol):
    """A backend that sends one email to several recipients in one request.

    Returns the provider's message id, the same for every recipient. It sends
    all the copies or none: the request is accepted or refused as a whole.
    """

    def send_group(self, group: OutgoingGroup) -> str: ...


def sends_groups(backend: EmailBackend) -> TypeGuard[GroupBackend]:
    """Whether ``backend`` sends an ``OutgoingGroup`` in one request (SendGrid does)."""
    return callable(getattr(backend, "send_group", None))


def build_backend(settings: Settings) -> EmailBackend:
    """The backend named by EMAIL_BACKEND."""
    if settings.email_backend == "sendgrid":
        from workers.email.sendgrid_backend import SendGridBackend

        return SendGridBackend.from_settings(settings)
    if settings.email_backend == "console":
        from workers.email.console_backend import ConsoleBackend

        return ConsoleBackend(mail_domain=_domain_of(settings.mail_from))
    from workers.email.file_backend import FileBackend

    return FileBackend(outbox_dir=settings.effective_outbox_dir, mail_domain=_domain_of(settings.mail_from))


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"
