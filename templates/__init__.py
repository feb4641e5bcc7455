"""Jinja2 email templates: ``{kind}.{locale}.html``, ``.txt`` and ``.subject``.

HTML templates are rendered with autoescaping; text bodies and subjects are not
HTML and are rendered without it. French is the default locale.
"""
