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


#: Invisible format characters some scripts need inside words (ZWNJ in Persian, ZWJ in
#: Indic scripts and emoji): every other format character (Cf) is refused.
_JOINERS = frozenset("\u200c\u200d")


def has_control_characters(value: str) -> bool:
    """True if ``value`` holds a control, a line or paragraph separator, or an invisible format character.

    Format characters (zero-width space, byte-order mark, bidi controls...) show
    nothing, so two names that read the same could differ: one company could
    bind a look-alike of another's name.
    """
    # Fast path for the usual text: a printable string (str.isprintable) holds no
    # character of those categories, and the bidi controls are format characters.
    if value.isprintable():
        return False
    return any(
        unicodedata.category(ch) in ("Cc", "Zl", "Zp")
        or (unicodedata.category(ch) == "Cf" and ch not in _JOINERS)
        or ch in _BIDI_CONTROLS
        for ch in value
    )


def clean_text(value: str, *, max_length: int, what: str) -> str:
    """Trim, apply NFC and refuse empty, over-long or control-character text."""
    value = unicodedata.normalize("NFC", value.strip())
    if not value:
        raise ValueError(f"{what} is empty")
    if len(value) > max_length:
        raise ValueError(f"{what} is longer than {max_length} characters")
    if has_control_characters(value):
        raise ValueError(f"{what} contains control characters (line breaks, tabs or invisible characters)")
    return value


def is_identifier(value: str) -> bool:
    """True if ``value`` uses only letters, digits, ``.``, ``_`` and ``-``."""
    return bool(_IDENTIFIER_RE.match(value))


def utf8_text(value: str) -> str:
    """``value`` with what UTF-8 cannot hold replaced by "?": lone surrogates, which is
    how Python keeps bytes a command line could not decode, or JSON's ``"\\ud800"``.

    ``utf8_text(value) == value`` tells whether ``value`` is text at all.
    """
    return value.encode("utf-8", "replace").decode("utf-8")
