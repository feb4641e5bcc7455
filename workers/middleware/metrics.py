"""Prometheus figures from Dramatiq's hooks: its own middleware, and the service's refusals."""

from __future__ import annotations

import os
from typing import Any

import dramatiq

from models.errors import Rejected
from workers.ops.metrics import count_rejection

#: Set by ``contract-dispatch worker`` for its worker processes (see ``workers.runner``):
#: prometheus_client then keeps every process's values in a file of that directory.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Refusals(dramatiq.Middleware):
    """Counts every message an actor refuses, by actor and error code."""

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if isinstance(exception, Rejected):
            count_rejection(message.actor_name, exception.code)


def dramatiq_prometheus() -> dramatiq.Middleware | None:
    """Dramatiq's Prometheus middleware, in worker processes started by ``contract-dispatch worker``.

    Elsewhere (producers, the CLI, in-process test workers) it would have no
    directory to share and no process boot to set it up, so it is left out.
    Its exposition server is not started: the worker's endpoint serves its
    figures with the service's own (``workers.ops.exporter``).
    """
    directory = os.environ.get(MULTIPROC_DIR_ENV)
    if not directory:
        return None
    # Dramatiq's module takes its directory from this variable, on import (and creates it).
    os.environ.setdefault("dramatiq_prom_db", directory)
    from dramatiq.common import q_name
    from dramatiq.middleware.prometheus import Prometheus

    class WorkerPrometheus(Prometheus):
        @property
        def forks(self) -> list[Any]:
            return []

        def before_delay_message(self, broker: dramatiq.Broker, message: Any) -> None:
            # Dramatiq counts a held message up under its delay queue's name (emails.DQ)
            # and down under its queue's (emails): each label drifted, one up, one down.
            self.delayed_messages.add(message.message_id)
            self.inprogress_delayed_messages.labels(q_name(message.queue_name), message.actor_name).inc()

        def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
            if message.message_id in self.delayed_messages and not delay:
                # The worker moved a message it held, due, to its queue: it holds it no
                # longer, whichever process takes it (Dramatiq counted it down only
                # when this same process happened to process it).
                self.delayed_messages.discard(message.message_id)
                self.inprogress_delayed_messages.labels(message.queue_name, message.actor_name).dec()
            # Dramatiq counts a retry twice: when Retries delays it, and again when the
            # worker moves it, due, from the delay queue to its queue (no delay then).
            if delay:
                super().after_enqueue(broker, message, delay)  # type: ignore[no-untyped-call]

    middleware: dramatiq.Middleware = WorkerPrometheus()
    return middleware
