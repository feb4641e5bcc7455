"""Render an email from ``templates/{kind}.{locale}.{html,txt,subject}``.

Two Jinja2 environments over the same files: the HTML one autoescapes every
value; the text one does not, because a text body or a subject is not HTML and
escaping would show ``&amp;`` to the reader. Environments are built once per
process; Jinja caches the compiled templates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2

import templates
from models.errors import RenderError
from models.text import has_control_characters

TEMPLATES_DIR = Path(templates.__file__).parent

#: Locales with templates; anything else falls back to the default.
LOCALES = ("fr", "en")
DEFAULT_LOCALE = "fr"


@dataclass(frozen=True)
class RenderedEmail:
    """The three parts of an email."""

    subject: str
    text: str
    html: str


@functools.cache
def _environment(*, autoescape: bool) -> jinja2.Environment:
    # autoescape=False only for text bodies and subjects, which are never HTML.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=autoescape,  # noqa: S701
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        auto_reload=False,
    )


def render_email(kind: str, locale: str, context: dict[str, Any]) -> RenderedEmail:
    """Render subject, text and HTML; refuse a subject that is not one clean line."""
    if locale not in LOCALES:
        locale = DEFAULT_LOCALE
    text_env = _environment(autoescape=False)
    try:
        subject = text_env.get_template(f"{kind}.{locale}.subject").render(context).strip()
        text = text_env.get_template(f"{kind}.{locale}.txt").render(context)
        html = (
            _environment(autoescape=True)
            .get_template(f"{kind}.{locale}.html")
            .render({**context, "subject": subject})
        )
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"no template {exc.name!r}") from None
    except jinja2.UndefinedError as exc:
        raise RenderError(f"template {kind}.{locale} needs a value that is missing: {exc}") from None
    if not subject or has_control_characters(subject):
        raise RenderError("the subject would be empty or hold control characters")
    return RenderedEmail(subject=subject, text=text, html=html)


def format_datetime(value: datetime, *, locale: str, timezone: str) -> str:
    """A date and time for a reader, in ``timezone``, worded for ``locale``."""
    local = value.astimezone(ZoneInfo(timezone))
    zone = local.tzname() or timezone
    if locale == "en":
        return f"{local.day} {local:%B %Y}, {local:%H:%M} ({zone})"
    return f"{local:%d/%m/%Y} à {local:%H:%M} ({zone})"
