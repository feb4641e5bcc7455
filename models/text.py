"""Checks and normalisation for user-typed text (names, titles, identifiers)."""

from __future__ import annotations

import re
import unicodedata

#: Bidirectional overrides and isolates: invisible, and able to make a name read
#: differently from what it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

#: Identifiers travel in URLs and file names: keep them to a safe alphabet.
IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]*$"
_IDENTIFIER_RE = re.compile(IDENTIFIER_PATTERN)


def has_control_characters(value: str) -> bool:
    """True if ``value`` holds a C0/C1 control, a line or paragraph separator, or a bidi control."""
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS for ch in value)


def clean_text(value: str, *, max_length: int, what: str) -> str:
    """Trim, apply NFC and refuse empty, over-long or control-character text."""
    value = unicodedata.normalize("NFC", value.strip())
    if not value:
        raise ValueError(f"{what} is empty")
    if len(value) > max_length:
        raise ValueError(f"{what} is longer than {max_length} characters")
    if has_control_characters(value):
        raise ValueError(f"{what} contains control characters (line breaks, tabs or invisible controls)")
    return value


def is_identifier(value: str) -> bool:
    """True if ``value`` uses only letters, digits, ``.``, ``_`` and ``-``."""
    return bool(_IDENTIFIER_RE.match(value))
