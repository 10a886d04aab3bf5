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
from gateway.store.base import SessionQuery, encode_cursor
from gateway.store.sqlite_rows import (
    OPEN_SESSION_COLUMNS,
    OUTBOX_COLUMNS,
    SELECT_CONTACTS,
    SESSION_COLUMNS,
    event_from_json,
    row_to_contact,
    row_to_open_session,
    row_to_outbound,
    row_to_session,
)


def _sessions(conn: sqlite3.Connection, tail: str, params: Sequence[Any]) -> list[Session]:
    """Sessions matching ``tail`` (WHERE/ORDER BY/LIMIT)."""
    sql = f"SELECT {', '.join(SESSION_COLUMNS)} FROM sessions {tail}"
    return [row_to_session(r) for r in conn.execute(sql, params)]


def _outbox(conn: sqlite3.Connection, tail: str, params: Sequence[Any]) -> list[OutboundMessage]:
    """Outbox messages matching ``tail`` (WHERE/ORDER BY/LIMIT)."""
    sql = f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM outbox {tail}"
    return [row_to_outbound(r) for r in conn.execute(sql, params)]


# -- sessions ------------------------------------------------------------------------------------


def select_open_sessions(conn: sqlite3.Connection, after: tuple[str, str] | None, limit: int) -> list[Session]:
    """Up to ``limit`` open sessions by (endpoint, conversation), those after ``after`` (the last
    (endpoint, conversation) read before), through the partial index of open sessions."""
    head = f"SELECT {', '.join(OPEN_SESSION_COLUMNS)} FROM sessions WHERE state = 'open'"
    if after is None:
        rows = conn.execute(f"{head} ORDER BY endpoint, conversation LIMIT ?", [limit])
    else:
        rows = conn.execute(
            f"{head} AND (endpoint, conversation) > (?, ?) ORDER BY endpoint, conversation LIMIT ?", [*after, limit]
        )
    return [row_to_open_session(r) for r in rows]


def select_session(conn: sqlite3.Connection, session_id: str) -> Session | None:
    """The session with this id, or None."""
    found = _sessions(conn, "WHERE id = ?", [session_id])
    return found[0] if found else None


def select_contact_sessions(conn: sqlite3.Connection, contact_id: str) -> list[Session]:
    """The contact's sessions, newest first."""
    return _sessions(conn, "WHERE contact_id = ? ORDER BY started_at DESC, id DESC", [contact_id])


def select_session_page(
    conn: sqlite3.Connection, query: SessionQuery, after: tuple[float, str] | None
) -> tuple[list[Session], str | None]:
    """A ``list_sessions`` page: the sessions ``query`` selects sorted after ``after`` (its
    decoded cursor), newest first (started_at, then id), and the next page's cursor."""
    clauses: list[str] = []
    params: list[Any] = []
    if query.state is not None:
        clauses.append("state = ?")
        params.append(query.state.value)
    if query.endpoint is not None:
        clauses.append("endpoint = ?")
        params.append(query.endpoint)
    if after is not None:
        clauses.append("(started_at, id) < (?, ?)")
        params.extend(after)
    limit = max(1, query.limit)
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    page = _sessions(conn, f"{where}ORDER BY started_at DESC, id DESC LIMIT ?", [*params, limit + 1])
    if len(page) <= limit:
        return page, None
    return page[:limit], encode_cursor(page[limit - 1])


def count_sessions(
    conn: sqlite3.Connection, since: float | None, until: float | None
) -> list[tuple[str, bool, bool, str | None, int]]:
    """Sessions started in ``[since, until)`` counted by (endpoint, interactive, developer,
    close_reason), in one GROUP BY over the ``sessions_by_start`` index."""
    clauses: list[str] = []
    params: list[float] = []
    if since is not None:
        clauses.append("started_at >= ?")
        params.append(since)
    if until is not None:
        clauses.append("started_at < ?")
        params.append(until)
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    sql = (
        "SELECT endpoint, interactive, developer, close_reason, count(*) FROM sessions "
        f"{where}GROUP BY endpoint, interactive, developer, close_reason"
    )
    return [(e, bool(i), bool(d), r, n) for e, i, d, r, n in conn.execute(sql, params)]


# -- outbox ---------------------------------------------------------------------------------------


def select_pending_outbox(conn: sqlite3.Connection, skip_channels: Sequence[str]) -> list[OutboundMessage]:
    """Messages still to send, in id order, except those of ``skip_channels``."""
    tail = "WHERE state = 'pending' AND channel NOT IN (SELECT value FROM json_each(?)) ORDER BY id"
    return _outbox(conn, tail, [json.dumps(list(skip_channels))])


def select_pending_outbox_of(conn: sqlite3.Connection, endpoint: str, conversation: str) -> list[OutboundMessage]:
    """One conversation's messages still to send, in id order (index outbox_by_conversation)."""
    tail = "WHERE endpoint = ? AND conversation = ? AND state = 'pending' ORDER BY id"
    return _outbox(conn, tail, [endpoint, conversation])


def select_dead_letters(conn: sqlite3.Connection, limit: int) -> list[OutboundMessage]:
    """Messages given up on, newest first."""
    return _outbox(conn, "WHERE state = 'dead' ORDER BY id DESC LIMIT ?", [limit])


def select_outbound(conn: sqlite3.Connection, message_id: int) -> OutboundMessage | None:
    """The outbox message with this id, or None."""
    found = _outbox(conn, "WHERE id = ?", [message_id])
    return found[0] if found else None


def count_dead_letters(conn: sqlite3.Connection) -> int:
    """How many dead letters there are (one count over the ``outbox_by_state`` index)."""
    return int(conn.execute("SELECT count(*) FROM outbox WHERE state = 'dead'").fetchone()[0])


# -- contacts, the inbox, settings ---------------------------------------------------------------


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


def select_conversation_secret(conn: sqlite3.Connection, endpoint: str, conversation: str) -> str | None:
    """The secret hash of an issued conversation, or None."""
    sql = "SELECT secret_hash FROM conversation_secrets WHERE endpoint = ? AND conversation = ?"
    row = conn.execute(sql, (endpoint, conversation)).fetchone()
    return None if row is None else str(row[0])
