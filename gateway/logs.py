"""Logging set-up (``logging.format``, ``logging.level``): one line per record on stderr.

- ``text``: ``<time> <LEVEL> <logger>: <message>``.
- ``json``: one JSON object per line with ``ts`` (ISO 8601 UTC), ``level``, ``logger``,
  ``message``, and ``endpoint``, ``conversation``, ``session_id`` when the line concerns one
  (passed as ``extra=log_context(...)``); ``exception`` holds a traceback, inside the one line.

The gateway's own loggers (``gateway.*``, ``channels.*``) log at the configured level; every
other library (aiohttp, twilio, slack-sdk, line-bot-sdk, urllib3 ...) at WARNING or above,
unless the level is DEBUG: the Twilio client alone writes about ten INFO lines per SMS.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from gateway.settings import LogFormat
from gateway.wire import iso

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HANDLER_NAME = "chat-gateway"  # our handler on the root logger; others (a test runner's) stay
CONTEXT_FIELDS = ("endpoint", "conversation", "session_id")
OWN_LOGGERS = ("gateway", "channels")


def log_context(
    endpoint: str | None = None, conversation: str | None = None, session_id: str | None = None
) -> dict[str, Any]:
    """``extra=`` for a log call about an endpoint, a conversation or a session."""
    values = {"endpoint": endpoint, "conversation": conversation, "session_id": session_id}
    return {key: value for key, value in values.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """A record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: LogFormat, level: str) -> None:
    """Send every record to stderr in ``log_format``; ours at ``level``, others at WARNING+
    (DEBUG: everything). Replaces the handler a previous call installed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.JSON else logging.Formatter(TEXT_FORMAT))
    numeric = logging.getLevelNamesMapping()[level]
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)


class HeldRecords(logging.Handler):
    """Keeps the records logged before the format is known (while the file is read), to be
    replayed once it is (``replay``), so they read like every later line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        for record in self.records:
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        self.records.clear()
