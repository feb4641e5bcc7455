"""Which failures are retried: transient ones only, with backoff and jitter."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import redis
from sqlalchemy.exc import DBAPIError, OperationalError

from models.errors import PermanentError, TransientError
from workers.settings import get_settings

#: Exceptions from libraries that mean "try again later".
_TRANSIENT_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying; programming errors and refusals are not."""
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, (TransientError, dramatiq.Retry, *_TRANSIENT_LIBRARY_ERRORS)):
        return True
    # A dropped database connection surfaces as a DBAPIError flagged as such.
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_when(max_retries: int) -> Callable[[int, BaseException], bool]:
    """Dramatiq's ``retry_when`` predicate: transient, and fewer than ``max_retries`` so far."""

    def should_retry(retries: int, exc: BaseException) -> bool:
        return retries < max_retries and is_transient(exc)

    return should_retry


@contextlib.contextmanager
def honour_retry_after() -> Iterator[None]:
    """Turn a transient error that knows when to come back into ``dramatiq.Retry(delay=...)``."""
    try:
        yield
    except TransientError as exc:
        if exc.retry_after_ms is None:
            raise
        raise dramatiq.Retry(str(exc), delay=exc.retry_after_ms) from exc


def underlying(exception: BaseException | None) -> BaseException | None:
    """The error a ``honour_retry_after`` ``Retry`` stands for (its cause); any other as it is.

    What records and logs name: a rate-limited email that runs out of retries
    died of ``ProviderRateLimited``, not of Dramatiq's ``Retry``.
    """
    if isinstance(exception, dramatiq.Retry) and exception.__cause__ is not None:
        return exception.__cause__
    return exception


def actor_options(actor_name: str) -> dict[str, Any]:
    """Dramatiq actor options: this actor's retry policy from settings; refusals never retried."""
    policy = get_settings().retry_policy(actor_name)
    return {
        "max_retries": policy.max_retries,
        "min_backoff": policy.min_backoff_ms,
        "max_backoff": policy.max_backoff_ms,
        "retry_when": retry_when(policy.max_retries),
        "throws": (PermanentError,),
    }
