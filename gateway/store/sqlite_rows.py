"""Row <-> model conversion for the SQLite store: column lists, row tuples, JSON columns, and
the writer's statements, which depend on the column order (the schema itself is in sqlite_schema.py).

Rows going in are built on the event loop when a write is submitted (a snapshot, so the writer
thread never reads a model object the loop may be changing); rows coming out become models on
the reader's thread, inside the ``select_*`` functions of sqlite_reads.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from gateway.models import (
    CloseReason,
    Contact,
    EventKind,
    InboundEvent,
    JSONDict,
    MessageKind,
    OutboundMessage,
    OutboxState,
    Session,
    SessionState,
)

Row = tuple[Any, ...]

# Column order of the row tuples below; the bulk SQL below is built from these lists.
SESSION_COLUMNS = (
    "id",
    "endpoint",
    "channel",
    "conversation",
    "contact_id",  # derived (endpoint:conversation), stored for the contact history index
    "started_at",
    "last_activity_at",
    "expires_at",
    "state",
    "interactive",
    "developer",
    "closed_at",
    "close_reason",
    "notice",
    "message_count",
    "intent",
    "variables",
    "context",
)
SESSION_STATE = SESSION_COLUMNS.index("state")
# What restore reads of an open session: the closing columns are NULL and the state is 'open'
# on every such row, and the contact id is derived. Five columns fewer than SESSION_COLUMNS
# read a million rows 0.35 s (a quarter) sooner.
OPEN_SESSION_COLUMNS = (
    "id",
    "endpoint",
    "channel",
    "conversation",
    "started_at",
    "last_activity_at",
    "expires_at",
    "interactive",
    "developer",
    "message_count",
    "intent",
    "variables",
    "context",
)
CONTACT_COLUMNS = (
    "id",
    "endpoint",
    "conversation",
    "created_at",
    "display_name",
    "opted_out",
    "last_user_message_at",
    "variables",
    "auth_profiles",
)
# Without "id": the store assigns it on insert.
OUTBOX_INSERT_COLUMNS = (
    "key",
    "endpoint",
    "channel",
    "conversation",
    "kind",
    "text",
    "created_at",
    "session_id",
    "reply_token",
    "reply_token_expires_at",
    "user_last_seen_at",
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
    "sent_at",
    "parts_sent",
)
OUTBOX_COLUMNS = ("id", *OUTBOX_INSERT_COLUMNS)
# The fields a delivery attempt changes; the row ends with the id for "WHERE id = ?".
# ``parts_sent`` is not among them: it has its own narrow write (SET_PARTS_SENT).
OUTBOX_UPDATE_COLUMNS = ("state", "attempts", "next_attempt_at", "last_error", "sent_at")


def _names(columns: Sequence[str]) -> str:
    return ", ".join(columns)


def _from_json(columns: Sequence[str]) -> str:
    """A select list reading each column from one JSON array per row of ``json_each(?)``."""
    return ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))


def _set_excluded(columns: Sequence[str]) -> str:
    return ", ".join(f"{c} = excluded.{c}" for c in columns)


# Bulk statements: a whole batch of rows goes in as ONE JSON array parameter (a list of row
# tuples), so a batch costs a few sqlite3 calls however many rows it has. Python's sqlite3
# releases and retakes the GIL around every row of executemany, and while the event loop is
# busy each retake can wait for a full switch interval (5 ms): measured, executemany of 100k
# upserts took 19-36 s beside a busy thread and 1 s beside an idle one; this form ~3 s and
# ~1.5 s. SQLite's JSON parser reads floats back exactly (tested on random doubles).
# "WHERE true" is SQLite's documented way to let an upsert follow INSERT ... SELECT.

# A session's identity never changes, and a closed session stays closed (it is never reopened:
# a later message opens a new one). So an upsert of an OPEN session leaves out the identity
# columns and ``state``, and SQLite then leaves every index alone: measured on 100k sessions with
# random ids, touching them all took 11 s with "SET every column" and 3 s like this. It also
# skips rows already closed in the store, so a stale open copy cannot resurrect a closed session.
# Closed sessions are written first in a batch (see sqlite_writer.py), which with this rule gives the
# same result as applying the changes one by one.
_SESSION_UPSERT = (
    f"INSERT INTO sessions ({_names(SESSION_COLUMNS)}) SELECT {_from_json(SESSION_COLUMNS)} FROM json_each(?) "
    "WHERE true ON CONFLICT (id) DO UPDATE SET "
)
_SESSION_IDENTITY = {"id", "endpoint", "channel", "conversation", "contact_id", "started_at"}
UPSERT_OPEN_SESSIONS = (
    _SESSION_UPSERT
    + _set_excluded([c for c in SESSION_COLUMNS if c not in _SESSION_IDENTITY and c != "state"])
    + " WHERE sessions.state = 'open'"
)
UPSERT_CLOSED_SESSIONS = _SESSION_UPSERT + _set_excluded([c for c in SESSION_COLUMNS if c not in _SESSION_IDENTITY])
UPSERT_CONTACTS = (
    f"INSERT INTO contacts ({_names(CONTACT_COLUMNS)}) SELECT {_from_json(CONTACT_COLUMNS)} FROM json_each(?) "
    f"WHERE true ON CONFLICT (id) DO UPDATE SET {_set_excluded(CONTACT_COLUMNS[1:])}"
)
INSERT_OUTBOX = (
    f"INSERT INTO outbox ({_names(OUTBOX_INSERT_COLUMNS)}) SELECT {_from_json(OUTBOX_INSERT_COLUMNS)} "
    "FROM json_each(?) WHERE true ON CONFLICT (key) DO NOTHING"
)
# Rows of OUTBOX_UPDATE_COLUMNS + id; at most one row per id (UPDATE FROM applies one match).
UPDATE_OUTBOX = (
    "UPDATE outbox SET "
    + ", ".join(f"{c} = json_extract(u.value, '$[{i}]')" for i, c in enumerate(OUTBOX_UPDATE_COLUMNS))
    + f" FROM json_each(?) AS u WHERE outbox.id = json_extract(u.value, '$[{len(OUTBOX_UPDATE_COLUMNS)}]')"
)
# Rows of (id, parts_sent); at most one row per id.
SET_PARTS_SENT = (
    "UPDATE outbox SET parts_sent = json_extract(p.value, '$[1]') FROM json_each(?) AS p "
    "WHERE outbox.id = json_extract(p.value, '$[0]')"
)
INSERT_INBOUND = (
    "INSERT INTO inbound (endpoint, dedup_key, payload, arrival_at, state) SELECT json_extract(value, '$[0]'), "
    "json_extract(value, '$[1]'), json_extract(value, '$[2]'), json_extract(value, '$[3]'), 'pending' "
    "FROM json_each(?) WHERE true ON CONFLICT (endpoint, dedup_key) DO NOTHING"
)
NEW_INBOUND_IDS = "SELECT json_group_array(json_array(endpoint, dedup_key, id)) FROM inbound WHERE id > ?"
MARK_HANDLED = "UPDATE inbound SET state = 'done' WHERE id IN (SELECT value FROM json_each(?))"
SET_NOTICES = (
    "UPDATE sessions SET notice = json_extract(n.value, '$[1]') FROM json_each(?) AS n "
    "WHERE sessions.id = json_extract(n.value, '$[0]')"
)

# Closes sharing (closed_at, close_reason, notice) -- a batch of due sessions shares all three --
# go in as one JSON object {session id: expires_at}: json_each's key and value need no
# json_extract per row, which made the 5-column form 1.5x the writer's CPU per close (1M rows).
# A session already closed in the store stays as it was (closed is final).
CLOSE_SESSIONS = (
    "UPDATE sessions SET state = 'closed', closed_at = ?, close_reason = ?, notice = ?, expires_at = c.value, "
    "variables = NULL, context = NULL FROM json_each(?) AS c WHERE sessions.id = c.key AND sessions.state = 'open'"
)

OUTBOX_IDS = (
    "SELECT json_group_object(key, id) FROM outbox WHERE key IN (SELECT json_extract(value, '$[0]') FROM json_each(?))"
)
# Run by the writer (the contact of each inbox commit) and by sqlite_reads.select_contacts.
SELECT_CONTACTS = f"SELECT {_names(CONTACT_COLUMNS)} FROM contacts WHERE id IN (SELECT value FROM json_each(?))"


def _dump(value: JSONDict | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _dump_object(value: JSONDict) -> str:
    """A JSON object column; most contacts have no variables or profiles (no encoder call)."""
    return json.dumps(value, separators=(",", ":")) if value else "{}"


def _load(text: str | None) -> JSONDict | None:
    return None if text is None else dict(json.loads(text))


def session_to_row(s: Session) -> Row:
    """A session as a row in ``SESSION_COLUMNS`` order. Raises TypeError/ValueError on JSON it cannot encode."""
    return (
        s.id,
        s.endpoint,
        s.channel,
        s.conversation,
        s.contact_id,
        s.started_at,
        s.last_activity_at,
        s.expires_at,
        s.state.value,
        int(s.interactive),
        int(s.developer),
        s.closed_at,
        None if s.close_reason is None else s.close_reason.value,
        s.notice,
        s.message_count,
        s.intent,
        _dump(s.variables),
        _dump(s.context),
    )


def close_row(s: Session) -> Row:
    """The closing columns of a closed session, for ``CLOSE_SESSIONS``."""
    # The reason as its StrEnum member, a str to sqlite3: ``.value`` is a Python-level
    # descriptor, a measurable cost when a mass expiry closes 100,000 sessions a second.
    return (s.id, s.closed_at, s.close_reason, s.notice, s.expires_at)


# Enum members by value: a dict lookup, where calling the enum costs ~1 us (restore: a million).
_SESSION_STATES = {member.value: member for member in SessionState}
_CLOSE_REASONS = {member.value: member for member in CloseReason}


def row_to_session(r: Row) -> Session:
    """The inverse of ``session_to_row``. Endpoint and channel names are interned: a million
    restored sessions share a handful of strings instead of holding two copies each; so is
    the float of a session whose last activity is its start (one message), 24 B each.
    Arguments by position, in ``Session``'s field order: a third of the keyword call's cost,
    a million times at restore."""
    return Session(
        r[0],  # id
        sys.intern(r[1]),  # endpoint
        sys.intern(r[2]),  # channel
        r[3],  # conversation
        r[5],  # started_at
        r[5] if r[6] == r[5] else r[6],  # last_activity_at
        r[7],  # expires_at
        _SESSION_STATES[r[8]],  # state
        bool(r[9]),  # interactive
        bool(r[10]),  # developer
        r[11],  # closed_at
        None if r[12] is None else _CLOSE_REASONS[r[12]],  # close_reason
        r[13],  # notice
        r[14],  # message_count
        r[15],  # intent
        None if r[16] is None else _load(r[16]),  # variables
        None if r[17] is None else _load(r[17]),  # context
    )


def row_to_open_session(r: Row) -> Session:
    """An open session from a row in ``OPEN_SESSION_COLUMNS`` order (restore; as
    ``row_to_session``)."""
    return Session(
        r[0],  # id
        sys.intern(r[1]),  # endpoint
        sys.intern(r[2]),  # channel
        r[3],  # conversation
        r[4],  # started_at
        r[4] if r[5] == r[4] else r[5],  # last_activity_at
        r[6],  # expires_at
        SessionState.OPEN,
        bool(r[7]),  # interactive
        bool(r[8]),  # developer
        None,  # closed_at
        None,  # close_reason
        None,  # notice
        r[9],  # message_count
        r[10],  # intent
        None if r[11] is None else _load(r[11]),  # variables
        None if r[12] is None else _load(r[12]),  # context
    )


def contact_to_row(c: Contact) -> Row:
    """A contact as a row in ``CONTACT_COLUMNS`` order."""
    return (
        c.id,
        c.endpoint,
        c.conversation,
        c.created_at,
        c.display_name,
        int(c.opted_out),
        c.last_user_message_at,
        _dump_object(c.variables),
        _dump_object(c.auth_profiles),
    )


def row_to_contact(r: Row) -> Contact:
    """The inverse of ``contact_to_row``."""
    return Contact(
        id=r[0],
        endpoint=r[1],
        conversation=r[2],
        created_at=r[3],
        display_name=r[4],
        opted_out=bool(r[5]),
        last_user_message_at=r[6],
        variables=dict(json.loads(r[7])),
        auth_profiles=dict(json.loads(r[8])),
    )


def outbox_insert_row(m: OutboundMessage) -> Row:
    """A new outbox message as a row in ``OUTBOX_INSERT_COLUMNS`` order."""
    return (
        m.key,
        m.endpoint,
        m.channel,
        m.conversation,
        m.kind.value,
        m.text,
        m.created_at,
        m.session_id,
        m.reply_token,
        m.reply_token_expires_at,
        m.user_last_seen_at,
        m.state.value,
        m.attempts,
        m.next_attempt_at,
        m.last_error,
        m.sent_at,
        m.parts_sent,
    )


def outbox_update_row(m: OutboundMessage) -> Row:
    """``OUTBOX_UPDATE_COLUMNS`` followed by the message id."""
    return (m.state.value, m.attempts, m.next_attempt_at, m.last_error, m.sent_at, m.id)


def row_to_outbound(r: Row) -> OutboundMessage:
    """An outbox row in ``OUTBOX_COLUMNS`` order as a message."""
    return OutboundMessage(
        id=r[0],
        key=r[1],
        endpoint=r[2],
        channel=r[3],
        conversation=r[4],
        kind=MessageKind(r[5]),
        text=r[6],
        created_at=r[7],
        session_id=r[8],
        reply_token=r[9],
        reply_token_expires_at=r[10],
        user_last_seen_at=r[11],
        state=OutboxState(r[12]),
        attempts=r[13],
        next_attempt_at=r[14],
        last_error=r[15],
        sent_at=r[16],
        parts_sent=r[17],
    )


def event_to_json(e: InboundEvent) -> str:
    """The inbound event as the JSON payload of its inbox row: orjson (once per message), or
    the standard library for what orjson cannot write (an integer past 64 bits in a platform's
    attachment) and the standard library reads back."""
    payload = {
        "conversation": e.conversation,
        "kind": e.kind.value,
        "dedup_key": e.dedup_key,
        "message_id": e.message_id,
        "text": e.text,
        "attachments": list(e.attachments),
        "timestamp": e.timestamp,
        "reply_token": e.reply_token,
        "reply_token_expires_at": e.reply_token_expires_at,
        "sender_name": e.sender_name,
    }
    try:
        return orjson.dumps(payload).decode()
    except orjson.JSONEncodeError:
        return json.dumps(payload, separators=(",", ":"))


def event_from_json(text: str) -> InboundEvent:
    """The inverse of ``event_to_json``."""
    d = json.loads(text)
    return InboundEvent(
        conversation=d["conversation"],
        kind=EventKind(d["kind"]),
        dedup_key=d["dedup_key"],
        message_id=d["message_id"],
        text=d["text"],
        attachments=tuple(d["attachments"]),
        timestamp=d["timestamp"],
        reply_token=d["reply_token"],
        reply_token_expires_at=d["reply_token_expires_at"],
        sender_name=d["sender_name"],
    )
