"""The service's own Prometheus counters, incremented where things happen.

Under ``contract-dispatch worker`` each worker process writes its values to a
file of its own in METRICS_DIR (prometheus_client's multiprocess mode, switched
on by ``PROMETHEUS_MULTIPROC_DIR``, which the runner sets before any worker
process imports prometheus_client); the endpoint and ``contract-dispatch
metrics`` add them up (see ``workers.ops.exporter``). Anywhere else (the CLI,
tests running a worker in-process) the values live in this process's memory,
readable through ``REGISTRY``.

Recording a figure never fails the job that reports it: an error is logged once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

from models.errors import ProviderRateLimited, ProviderRejected, ProviderUnavailable

logger = logging.getLogger(__name__)

#: This process's own values (in multiprocess mode the files are what counts).
REGISTRY = CollectorRegistry()

EMAILS = Counter(
    "contract_dispatch_emails_total",
    "Email outcomes: sent (accepted by the provider), failed (failed for good), cancelled "
    "(dropped: the contract no longer wants it), retried (an attempt failed with a transient "
    "error and the email stayed pending).",
    ["kind", "outcome"],
    registry=REGISTRY,
)

REJECTIONS = Counter(
    "contract_dispatch_rejections_total",
    "Messages refused by an actor (permanent, never retried), by actor and error code.",
    ["actor", "code"],
    registry=REGISTRY,
)

REMINDERS = Counter(
    "contract_dispatch_reminders_total",
    "Reminders handled by sweeps: enqueued (claimed, its email enqueued) or postponed "
    "(due outside the sending window).",
    ["outcome"],
    registry=REGISTRY,
)

REMINDER_SWEEPS = Counter(
    "contract_dispatch_reminder_sweeps_total",
    "Reminder sweeps run by workers, by outcome (done or failed).",
    ["outcome"],
    registry=REGISTRY,
)

#: Bucket bounds in seconds: a send usually takes tens to hundreds of milliseconds,
#: and SENDGRID_TIMEOUT (10 s by default) bounds it.
PROVIDER_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

PROVIDER_SECONDS = Histogram(
    "contract_dispatch_provider_send_duration_seconds",
    "Time one email takes at the provider, in seconds, by backend and outcome (accepted, "
    "rejected, rate_limited, unavailable, error).",
    ["backend", "outcome"],
    buckets=PROVIDER_BUCKETS,
    registry=REGISTRY,
)

#: Every metric name this module exports (counters with their ``_total``).
SERVICE_METRIC_NAMES = (
    "contract_dispatch_emails_total",
    "contract_dispatch_rejections_total",
    "contract_dispatch_reminders_total",
    "contract_dispatch_reminder_sweeps_total",
    "contract_dispatch_provider_send_duration_seconds",
)

_warned = threading.Event()


def _safely(record: Callable[[], None]) -> None:
    try:
        record()
    except Exception:
        # E.g. METRICS_DIR deleted under a running worker: the job must go on.
        if not _warned.is_set():
            _warned.set()
            logger.warning("Could not record a metric; later failures are not logged.", exc_info=True)


def count_email(kind: str, outcome: str, amount: int = 1) -> None:
    """One email (or ``amount``) of ``kind`` reached ``outcome``."""
    if amount > 0:
        _safely(lambda: EMAILS.labels(kind=kind, outcome=outcome).inc(amount))


def count_rejection(actor: str, code: str) -> None:
    """An actor refused a message with this error code."""
    _safely(lambda: REJECTIONS.labels(actor=actor, code=code).inc())


def count_reminders(outcome: str, amount: int) -> None:
    """``amount`` reminders were enqueued or postponed by a sweep."""
    if amount > 0:
        _safely(lambda: REMINDERS.labels(outcome=outcome).inc(amount))


def count_sweep(outcome: str) -> None:
    """A reminder sweep ended (``done`` or ``failed``)."""
    _safely(lambda: REMINDER_SWEEPS.labels(outcome=outcome).inc())


def provider_outcome(error: BaseException | None) -> str:
    """The ``outcome`` label of one provider call, from the error it raised (None: accepted)."""
    if error is None:
        return "accepted"
    if isinstance(error, ProviderRejected):
        return "rejected"
    if isinstance(error, ProviderRateLimited):
        return "rate_limited"
    if isinstance(error, ProviderUnavailable):
        return "unavailable"
    return "error"


def observe_provider(backend: str, error: BaseException | None, seconds: float) -> None:
    """One provider call took ``seconds`` and ended with ``error`` (None when accepted)."""
    outcome = provider_outcome(error)
    _safely(lambda: PROVIDER_SECONDS.labels(backend=backend, outcome=outcome).observe(seconds))
