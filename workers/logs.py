"""Logging setup, and the guard that keeps SendGrid's debug output out of every log."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

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


#: The line format of ``LOG_FORMAT=text``.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(threadName)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def apply_log_format(log_format: str) -> None:
    """Give every handler of the root logger the ``text`` or ``json`` format."""
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    silence_sendgrid_debug()


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Line logging at ``level`` for the CLI and workers, as text or JSON."""
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT)
    # basicConfig does nothing once the root logger has a handler: a command that
    # asks for another level (the scheduler logs at INFO) must still get it.
    logging.getLogger().setLevel(level.upper())
    apply_log_format(log_format)
