"""Render an email from ``templates/{kind}.{locale}.{html,txt,subject}``.

Two Jinja2 environments over the same files: the HTML one autoescapes every
value; the text one does not, because a text body or a subject is not HTML and
escaping would show ``&amp;`` to the reader. Environments are built once per
process; Jinja caches the compiled templates.

Jinja2 is imported when the first environment is built, not with this module:
producers import the actors, and so this module, but never render (Jinja2 is
about 60 ms of a command's start). A worker builds both environments and compiles
every template at boot (``load_templates``, from ``workers.middleware.templates``),
so its first emails wait for neither.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import templates
from models.errors import RenderError
from models.text import has_control_characters

if TYPE_CHECKING:
    import jinja2

TEMPLATES_DIR = Path(templates.__file__).parent

#: The template files' suffixes, and the one rendered with autoescaping.
TEMPLATE_SUFFIXES = (".html", ".txt", ".subject")
HTML_SUFFIX = ".html"

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
    import jinja2

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
    import jinja2

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


def load_templates() -> int:
    """Compile every template into its environment's cache; how many there are.

    The HTML ones into the autoescaping environment, the text bodies and subjects
    into the other, as ``render_email`` asks for them.
    """
    names = sorted(path.name for path in TEMPLATES_DIR.iterdir() if path.suffix in TEMPLATE_SUFFIXES)
    for name in names:
        _environment(autoescape=name.endswith(HTML_SUFFIX)).get_template(name)
    return len(names)


def format_datetime(value: datetime, *, locale: str, timezone: str) -> str:
    """A date and time for a reader, in ``timezone``, worded for ``locale``."""
    local = value.astimezone(ZoneInfo(timezone))
    zone = local.tzname() or timezone
    if locale == "en":
        return f"{local.day} {local:%B %Y}, {local:%H:%M} ({zone})"
    return f"{local:%d/%m/%Y} à {local:%H:%M} ({zone})"
