"""User-supplied text in log lines is escaped: no control characters, so no forged lines
(DESIGN.md "Hostile input"). A conversation id, a reason or a path may come from anyone.

``install()`` sets a log record factory, process-wide, whose records render every argument of a
log call (the ``%s`` parts, where user text goes; numbers stay numbers for ``%d``) with ``\\n``,
``\\r``, ``\\x1b`` ... instead of the characters themselves. The format strings are the
gateway's own; ``record.args`` stay as given. Tracebacks are left as they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """``text`` with every control character written as an escape sequence."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), m.group().encode("unicode_escape").decode("ascii")), text)


class _Escaped:
    """A log argument whose text is escaped however the format string renders it."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape(str(self.value))

    def __repr__(self) -> str:
        return escape(repr(self.value))

    def __format__(self, spec: str) -> str:
        return escape(format(self.value, spec))


def _wrap(value: object) -> object:
    if value is None or isinstance(value, int | float):
        return value  # %d and %.2f need the number itself; numbers hold no control characters
    return _Escaped(value)


def _escaped_args(args: Any) -> Any:
    if isinstance(args, Mapping):
        return {key: _wrap(value) for key, value in args.items()}
    if isinstance(args, tuple):
        return tuple(_wrap(value) for value in args)
    return args


class EscapingLogRecord(logging.LogRecord):
    """A log record whose message renders its arguments escaped (``args`` stay as given)."""

    def getMessage(self) -> str:
        msg = self.msg if isinstance(self.msg, str) else escape(str(self.msg))  # log.warning(exc)
        if self.args:
            msg = msg % _escaped_args(self.args)
        return msg


def install() -> None:
    """Render the arguments of every log record escaped from now on (idempotent)."""
    current = logging.getLogRecordFactory()
    if current is EscapingLogRecord or getattr(current, "escapes_arguments", False):
        return
    if current is logging.LogRecord:
        logging.setLogRecordFactory(EscapingLogRecord)
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:  # another factory was set first
        record = current(*args, **kwargs)
        if type(record) is logging.LogRecord:
            record.__class__ = EscapingLogRecord
        return record

    factory.escapes_arguments = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
