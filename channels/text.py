"""Text helpers shared by the platform adapters: splitting a long text, reading Retry-After.

Every adapter splits with ``split_text`` (its own limit and unit) and reads a ``Retry-After``
header with ``retry_after_s``, so that all platforms cut and wait the same way.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from datetime import UTC

# What a cut may fall on: what ``str.isspace`` calls whitespace, except the no-break spaces
# (U+00A0, U+2007, U+202F), which say "do not break here".
WHITESPACE = "".join(char for char in map(chr, range(0x3001)) if char.isspace() and char not in "\u00a0\u2007\u202f")
_WHITESPACE_SET = frozenset(WHITESPACE)
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def split_text(text: str, limit: int, *, utf16: bool = False, prefer_line_breaks: bool = False) -> list[str]:
    """``text`` in order as parts of at most ``limit`` characters, or UTF-16 code units when
    ``utf16`` (a character beyond U+FFFF, such as most emoji, counts two).

    - Empty text, or text of nothing but whitespace, gives no parts (``[]``).
    - Other text that fits is the one part, unchanged (leading and trailing whitespace kept).
    - Longer text is cut at the last whitespace that lies in the later half of the window (the
      ``limit`` that fits, plus the character right after it, where a word ending exactly at
      the limit is a clean cut). With ``prefer_line_breaks``, the last line break in that later
      half wins over any later space. With no whitespace there, the cut falls mid-word at the
      limit: a word longer than ``limit`` is spread over several parts.
    - The whitespace at a cut ends the earlier part (``"one two"`` at 5 gives ``"one "``,
      ``"two"``); whitespace that does not fit there (right after the limit, or the rest of a
      run across it) is dropped, so no part but the first starts with whitespace. A part that
      would be whitespace only (a long run at the start) is dropped too. So
      ``"".join(parts) == text`` but for that dropped whitespace.
    - A surrogate pair (one character beyond U+FFFF) is never cut; a mid-word cut may still
      separate the characters of one grapheme (a letter and its combining mark, a ZWJ emoji
      sequence).

    ``limit`` must be at least 1, and at least 2 when ``utf16`` (so that every character fits).
    """
    if limit < (2 if utf16 else 1):
        raise ValueError(f"limit {limit} is too small")
    if not text.strip(WHITESPACE):
        return []
    parts: list[str] = []
    rest = text
    while (fit := _fit(rest, limit, utf16)) < len(rest):
        cut = _cut(rest, fit, prefer_line_breaks)
        head = rest[:cut]
        if head.strip(WHITESPACE):
            parts.append(head)
        rest = rest[cut:].lstrip(WHITESPACE)
    if rest:
        parts.append(rest)
    return parts


def _fit(text: str, limit: int, utf16: bool) -> int:
    """How many leading characters of ``text`` fit in ``limit`` characters or UTF-16 units."""
    if not utf16:
        return min(limit, len(text))
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return index
    return len(text)


def _cut(text: str, fit: int, prefer_line_breaks: bool) -> int:
    """Where to cut ``text``, of which ``fit`` characters fit: just after the chosen whitespace
    (at most ``fit``), or at ``fit`` when no whitespace lies in the later half of the window."""
    low = fit // 2  # a whitespace at an index above this is in the later half
    found = -1
    if prefer_line_breaks:
        found = text.rfind("\n", low + 1, fit + 1)
    if found < 0:
        found = next((i for i in range(fit, low, -1) if text[i] in _WHITESPACE_SET), -1)
    return fit if found < 0 else min(found + 1, fit)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """The seconds to wait that a ``Retry-After`` header asks for, or None.

    Either form of RFC 9110: delta-seconds (``"120"``; a fraction such as ``"1.5"`` is accepted
    too), or an HTTP date (``"Wed, 21 Oct 2015 07:28:30 GMT"``, also the obsolete RFC 850 and
    asctime forms; a date without a zone is GMT), counted from ``now`` (POSIX seconds, default
    the current time); a date already past gives 0.0. Surrounding whitespace is ignored.
    None, empty, negative, non-finite or unreadable values give None.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)
