"""Logging setup, and the guards that keep SendGrid's debug output and payloads out of every log."""

from __future__ import annotations

import json
import logging
import traceback
from datetime import UTC, datetime
from typing import Any

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


#: The loggers whose lines name a message by its repr: Dramatiq's own.
DRAMATIQ_LOGGERS = "dramatiq."

#: The line each Dramatiq actor's logger writes at DEBUG with the call's arguments.
ACTOR_CALL_LINE = "Received args=%r kwargs=%r."


def _is_message(value: Any) -> bool:
    # A dramatiq.Message or the worker's MessageProxy around one.
    return hasattr(value, "message_id") and hasattr(value, "actor_name")


def _label(message: Any) -> str:
    return f"{message.actor_name} {message.message_id}"


def _without_text(error: BaseException) -> str:
    """A traceback with its frames and the exception's type, not its text."""
    kind = type(error)
    frames = "".join(traceback.format_tb(error.__traceback__))
    return (
        f"Traceback (most recent call last):\n{frames}{kind.__module__}.{kind.__qualname__} "
        "(its text is not logged)"
    )


class RedactMessages(logging.Filter):
    """Keeps payloads and exception texts out of Dramatiq's lines about a message.

    Dramatiq names a message by its repr (the actor's call with the whole payload:
    emails, legal names), logs an actor's exception with its text (a provider's
    answer may quote an email), and each actor logs its call's arguments at DEBUG. A
    line about a message keeps the actor, the message id, and the exception's type
    and frames; the reason stays in the dead letter.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == ACTOR_CALL_LINE:
            record.msg, record.args = "Received a call (its arguments are not logged).", ()
            return True
        if not record.name.startswith(DRAMATIQ_LOGGERS) or not isinstance(record.args, tuple):
            return True
        if any(_is_message(arg) for arg in record.args):
            record.args = tuple(_label(arg) if _is_message(arg) else arg for arg in record.args)
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = _without_text(record.exc_info[1])
        return True


def redact_dramatiq_messages() -> None:
    """Put ``RedactMessages`` on every handler of the root logger (where Dramatiq's lines end)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactMessages) for f in handler.filters):
            handler.addFilter(RedactMessages())


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
        if record.exc_text:
            data["exception"] = record.exc_text
        elif record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def apply_log_format(log_format: str) -> None:
    """Give every handler of the root logger the ``text`` or ``json`` format."""
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    silence_sendgrid_debug()
    redact_dramatiq_messages()


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Line logging at ``level`` for the CLI and workers, as text or JSON."""
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT)
    # basicConfig does nothing once the root logger has a handler: a command that
    # asks for another level (the scheduler logs at INFO) must still get it.
    logging.getLogger().setLevel(level.upper())
    apply_log_format(log_format)
