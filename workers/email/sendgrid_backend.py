"""The SendGrid backend, through the official ``sendgrid`` library (v3 mail send).

Four things the library does not do for us: it has no default timeout (we pass
one on every request), it logs the API key and the whole mail at DEBUG (its
logger is pinned to INFO, see ``workers.logs``), its client object is not
thread-safe (each worker thread gets its own), and it builds a new ``urllib``
opener for every request, whose connection is closed after each answer (each
thread keeps one opener, which keeps its connection alive: ``reuse_openers``).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import python_http_client.client
import sendgrid
from python_http_client import exceptions as http_errors
from sendgrid.helpers.mail import Category, CustomArg, From, Mail, Personalization, Substitution, To

from models.errors import ConfigurationError, ProviderRateLimited, ProviderRejected, ProviderUnavailable
from workers.email.keep_alive import keep_alive_opener
from workers.email.message import OutgoingEmail, OutgoingGroup
from workers.logs import silence_sendgrid_debug
from workers.settings import Settings

#: Provider answers that no retry can change.
PERMANENT_STATUSES = frozenset({400, 401, 403, 413})

#: Wait this long after a 429 that carries no usable reset header, in milliseconds.
DEFAULT_RATE_LIMIT_WAIT_MS = 60_000

#: Never wait longer than this for a rate-limit reset, in milliseconds.
MAX_RATE_LIMIT_WAIT_MS = 3_600_000

#: The provider's error messages are cut to this many characters in our errors.
ERROR_BODY_LIMIT = 300

#: What replaces an email's secret (its temporary password) in a provider error.
REDACTED = "[redacted]"


def rate_limit_wait_ms(headers: Any, *, now: float | None = None) -> int:
    """Milliseconds until ``X-RateLimit-Reset`` (epoch seconds), with a little jitter."""
    now = time.time() if now is None else now
    reset = headers.get("X-RateLimit-Reset") if headers is not None else None
    try:
        wait_ms = int((float(reset) - now) * 1000) if reset is not None else DEFAULT_RATE_LIMIT_WAIT_MS
    except ValueError:
        wait_ms = DEFAULT_RATE_LIMIT_WAIT_MS
    # Spread the retries of many workers so they do not all return at the reset.
    wait_ms = max(wait_ms, 0) + random.randint(100, 1000)  # noqa: S311 - jitter, not security
    return min(wait_ms, MAX_RATE_LIMIT_WAIT_MS)


def error_reasons(body: bytes | str) -> str:
    """The ``message`` and ``field`` of each error in a SendGrid error body, or "".

    Only those: the error is kept on the delivery and its dead letter, and the
    rest of a body (``help``, or a body that is not SendGrid's error format, from
    a proxy say) may quote the email, temporary password included.
    """
    try:
        errors = json.loads(body).get("errors")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(errors, list):
        return ""
    reasons = []
    for error in errors:
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            field = error.get("field")
            reasons.append(f"{error['message']} ({field})" if isinstance(field, str) else error["message"])
    return "; ".join(reasons)


def build_request_body(email: OutgoingEmail) -> dict[str, Any]:
    """The v3 mail/send JSON body, built with the library's helpers."""
    mail = Mail(
        from_email=From(email.from_email, email.from_name),
        to_emails=To(email.to_email, email.to_name),
        subject=email.subject,
        plain_text_content=email.text,
        html_content=email.html,
    )
    mail.custom_arg = CustomArg("reference", email.reference)
    mail.category = Category(email.kind)
    body: dict[str, Any] = mail.get()
    return body


def build_group_request_body(group: OutgoingGroup) -> dict[str, Any]:
    """One request for a group: one personalization per recipient, each with its own reference.

    A personalization's recipients see each other; one each keeps every
    signatory's address private. Substitutions fill in each recipient's name.
    """
    mail = Mail(
        from_email=From(group.from_email, group.from_name),
        subject=group.subject,
        plain_text_content=group.text,
        html_content=group.html,
    )
    for recipient in group.recipients:
        personalization = Personalization()
        personalization.add_to(To(recipient.email, recipient.name))
        personalization.add_custom_arg(CustomArg("reference", recipient.reference))
        for placeholder, value in recipient.substitutions.items():
            personalization.add_substitution(Substitution(placeholder, value))
        mail.add_personalization(personalization)
    mail.category = Category(group.kind)
    body: dict[str, Any] = mail.get()
    return body


class _OpenerPerThread:
    """``urllib.request`` as python_http_client sees it, with one opener per thread.

    python_http_client calls ``urllib.build_opener()`` for every request: ten
    handler objects, each introspected with ``dir()``, and the proxy settings read
    from the environment, which cost about as much CPU as the rest of the call
    (py-spy: 8 % of the workers' GIL time). An opener keeps no per-request state,
    so each thread reuses its own, which keeps its connection to the provider
    alive between emails (``workers.email.keep_alive``); everything else is the
    real module.
    """

    def __init__(self, module: Any) -> None:
        self._module = module
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def build_opener(self, *handlers: Any) -> Any:
        if handlers:
            return self._module.build_opener(*handlers)
        opener = getattr(self._local, "opener", None)
        if opener is None:
            opener = self._local.opener = keep_alive_opener()
        return opener


def reuse_openers() -> None:
    """Make python_http_client reuse one ``urllib`` opener per thread (idempotent).

    Only python_http_client's own reference to ``urllib.request`` changes, and
    only while it is the module it imported: a release that stops using it is
    left as it is.
    """
    if python_http_client.client.urllib is urllib.request:
        python_http_client.client.urllib = _OpenerPerThread(urllib.request)


class SendGridBackend:
    """Sends through SendGrid's v3 API; the message id is the ``X-Message-Id`` header."""

    name = "sendgrid"

    def __init__(self, *, api_key: str, host: str, timeout: float) -> None:
        self._api_key = api_key
        self.host = host
        self.timeout = timeout
        self._local = threading.local()
        silence_sendgrid_debug()
        reuse_openers()

    @classmethod
    def from_settings(cls, settings: Settings) -> SendGridBackend:
        if settings.sendgrid_api_key is None or not settings.sendgrid_api_key.get_secret_value():
            raise ConfigurationError("EMAIL_BACKEND=sendgrid needs SENDGRID_API_KEY")
        return cls(
            api_key=settings.sendgrid_api_key.get_secret_value(),
            host=settings.sendgrid_api_host,
            timeout=settings.sendgrid_timeout,
        )

    def __repr__(self) -> str:
        return f"SendGridBackend(host={self.host!r}, timeout={self.timeout!r})"

    def _client(self) -> sendgrid.SendGridAPIClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = sendgrid.SendGridAPIClient(api_key=self._api_key, host=self.host)
            # Propagated to every request built from this client.
            client.client.timeout = self.timeout
            self._local.client = client
        return client

    def send(self, email: OutgoingEmail) -> str:
        return self._post(build_request_body(email), secrets=email.secrets)

    def send_group(self, group: OutgoingGroup) -> str:
        return self._post(build_group_request_body(group))

    def _post(self, body: dict[str, Any], *, secrets: tuple[str, ...] = ()) -> str:
        try:
            response = self._client().client.mail.send.post(request_body=body, timeout=self.timeout)
        except http_errors.HTTPError as exc:
            raise self._error_for(exc, secrets=secrets) from None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise ProviderUnavailable(f"SendGrid did not answer: {type(exc).__name__}: {exc}") from None
        message_id = response.headers.get("X-Message-Id") if response.headers is not None else None
        return str(message_id or f"sendgrid-{response.status_code}-{int(time.time() * 1000)}")

    @staticmethod
    def _error_for(exc: http_errors.HTTPError, *, secrets: tuple[str, ...] = ()) -> Exception:
        status = int(getattr(exc, "status_code", 0) or 0)
        summary = f"SendGrid answered {status}"
        reasons = error_reasons(getattr(exc, "body", b"") or b"")
        if reasons:
            for secret in secrets:
                reasons = reasons.replace(secret, REDACTED)
            summary = f"{summary}: {reasons[:ERROR_BODY_LIMIT]}"
        if status == 429:
            return ProviderRateLimited(
                summary, retry_after_ms=rate_limit_wait_ms(getattr(exc, "headers", None))
            )
        if status in PERMANENT_STATUSES:
            return ProviderRejected(summary, status=status)
        return ProviderUnavailable(summary)
