"""Logging setup, and the guard that keeps SendGrid's debug output out of every log."""

from __future__ import annotations

import logging

#: The SendGrid library's HTTP client logs the Authorization header and the whole
#: mail (with any access code) at DEBUG through this logger.
SENDGRID_HTTP_LOGGER = "python_http_client.client"


class _DropBelowInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO


def silence_sendgrid_debug() -> None:
    """Pin SendGrid's HTTP logger to INFO, even when the root logger is at DEBUG.

    The level alone stops its DEBUG records; the filter is a second lock in case
    something later lowers the level again.
    """
    logger = logging.getLogger(SENDGRID_HTTP_LOGGER)
    logger.setLevel(logging.INFO)
    if not any(isinstance(f, _DropBelowInfo) for f in logger.filters):
        logger.addFilter(_DropBelowInfo())


def configure_logging(level: str = "INFO") -> None:
    """Plain line logging at ``level`` for the CLI and workers."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(process)d %(threadName)s %(name)s: %(message)s",
    )
    silence_sendgrid_debug()
