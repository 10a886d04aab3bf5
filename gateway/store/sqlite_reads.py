"""The SQLite store's reads, each run in one hop on the reader connection's thread
(``SqliteStore._read``): rows become models here, through the conversions of sqlite_rows.py.
A conversation's lines (transcript, web chat history) are read in sqlite_conversation.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from gateway.models import Contact, OutboundMessage, Session, StoredEvent
from gateway.store.sqlite_rows import (
    OUTBOX_COLUMNS,
    SELECT_CONTACTS,
    SESSION_COLUMNS,
    event_from_json,
    row_to_contact,
    row_to_outbound,
    row_to_session,
)


def select_sessions(conn: sqlite3.Connection, tail: str, params: Sequence[Any]) -> list[Session]:
    """Sessions matching ``tail`` (WHERE/ORDER BY/LIMIT)."""
    sql = f"SELECT {', '.join(SESSION_COLUMNS)} FROM sessions {tail}"
    return [row_to_session(r) for r in conn.execute(sql, params)]


def select_outbox(conn: sqlite3.Connection, tail: str, params: Sequence[Any]) -> list[OutboundMessage]:
    """Outbox messages matching ``tail`` (WHERE/ORDER BY/LIMIT)."""
    sql = f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM outbox {tail}"
    return [row_to_outbound(r) for r in conn.execute(sql, params)]


def select_contacts(conn: sqlite3.Connection, contact_ids: Sequence[str]) -> dict[str, Contact]:
    """The contacts that exist among ``contact_ids``, by id, in one query."""
    return {row[0]: row_to_contact(row) for row in conn.execute(SELECT_CONTACTS, (json.dumps(list(contact_ids)),))}


def select_pending_inbound(conn: sqlite3.Connection) -> list[StoredEvent]:
    """Inbound events not yet handled, in id order."""
    sql = "SELECT id, endpoint, arrival_at, payload FROM inbound WHERE state = 'pending' ORDER BY id"
    return [StoredEvent(r[0], r[1], r[2], event_from_json(r[3])) for r in conn.execute(sql)]


def select_ids(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """The first column of every row ``sql`` selects (retention candidates)."""
    return [row[0] for row in conn.execute(sql, params)]


def select_overrides(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """scope -> runtime settings."""
    return {scope: json.loads(value) for scope, value in conn.execute("SELECT scope, value FROM overrides")}
