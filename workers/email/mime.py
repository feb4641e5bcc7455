"""RFC 5322 messages for the file and console backends."""

from __future__ import annotations

from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import formatdate, make_msgid

from workers.email.message import OutgoingEmail


def _address(email: str, name: str | None) -> Address:
    local, _, domain = email.rpartition("@")
    return Address(display_name=name or "", username=local, domain=domain)


def build_mime(email: OutgoingEmail, *, mail_domain: str) -> EmailMessage:
    """A multipart/alternative message (text, then HTML) with a fresh Message-ID.

    The ``email`` package refuses CR or LF in any header value, a second guard
    behind the input validation.
    """
    # Plain RFC 5322: non-ASCII names and subjects become RFC 2047 encoded words,
    # which every reader decodes. Raw UTF-8 headers (RFC 6532) only when an
    # address itself is not ASCII, since encoded words are not allowed there.
    ascii_addresses = email.to_email.isascii() and email.from_email.isascii()
    message = EmailMessage(policy=SMTP if ascii_addresses else SMTPUTF8)
    message["From"] = _address(email.from_email, email.from_name)
    message["To"] = _address(email.to_email, email.to_name)
    message["Subject"] = email.subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = make_msgid(domain=mail_domain)
    message["X-Contract-Dispatch-Reference"] = email.reference
    message.set_content(email.text)
    message.add_alternative(email.html, subtype="html")
    return message
