"""A worker compiles the email templates at boot, not with its first emails.

Producers import the actors but never render, so ``workers.email.render``
imports Jinja2 only when it first builds an environment; without this, a worker
process's first emails would wait for that import (about 60 ms) and for their
templates' compilation (about 6 ms each kind and locale).
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

from workers.email.render import load_templates

logger = logging.getLogger(__name__)


class Templates(dramatiq.Middleware):
    """Loads Jinja2 and compiles every template before the worker starts its threads."""

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        count = load_templates()
        logger.debug("Compiled %d email templates.", count)
