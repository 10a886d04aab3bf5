"""A conversation's lines read from the SQLite store: the admin transcript (``GET
/admin/contacts/<id>``) and the web chat's history frame. Both join the inbox (user messages,
inside their JSON payload) with the outbox (messages sent to the user)."""

from __future__ import annotations

import json
import sqlite3

from gateway.models import EventKind, TranscriptEntry, TranscriptLine

_USER_KINDS = (EventKind.MESSAGE.value, EventKind.POSTBACK.value)


def select_transcript(
    conn: sqlite3.Connection, endpoint: str, conversation: str, since: float, until: float, limit: int
) -> list[TranscriptEntry]:
    """A conversation's messages in ``[since, until]``, oldest first, the newest ``limit``.

    User messages: the inbox rows of the endpoint in the time range (the ``inbound_done``
    index by arrival time, plus the few pending ones), matched on the payload's conversation.
    Sent messages: the ``outbox_by_conversation`` index.
    """
    entries: list[TranscriptEntry] = []
    inbound = (
        "SELECT arrival_at, payload FROM inbound WHERE endpoint = ?1 AND arrival_at BETWEEN ?3 AND ?4 "
        "AND state = 'done' AND json_extract(payload, '$.conversation') = ?2 "
        "UNION ALL SELECT arrival_at, payload FROM inbound WHERE state = 'pending' AND endpoint = ?1 "
        "AND arrival_at BETWEEN ?3 AND ?4 AND json_extract(payload, '$.conversation') = ?2"
    )
    for arrival_at, payload in conn.execute(inbound, (endpoint, conversation, since, until)):
        event = json.loads(payload)
        if event["kind"] not in _USER_KINDS:
            continue
        attachments = event.get("attachments") or ()
        types = tuple(str(item.get("type", "file")) for item in attachments if isinstance(item, dict))
        entries.append(TranscriptEntry(arrival_at, "user", event["kind"], event.get("text"), attachments=types))
    outbox = (
        "SELECT created_at, kind, text, session_id, state FROM outbox WHERE endpoint = ? AND conversation = ? "
        "AND created_at BETWEEN ? AND ?"
    )
    for created_at, kind, text, session_id, state in conn.execute(outbox, (endpoint, conversation, since, until)):
        entries.append(TranscriptEntry(created_at, "bot", kind, text, session_id=session_id, state=state))
    entries.sort(key=lambda entry: entry.at)
    return entries[-limit:] if limit > 0 else []


# The expression must read exactly as in the index inbound_by_conversation (sqlite_schema.py).
_HISTORY = """
SELECT at, sender, kind, text, message_id FROM (
    SELECT arrival_at AS at, 0 AS side, id, 'user' AS sender, json_extract(payload, '$.kind') AS kind,
        json_extract(payload, '$.text') AS text, json_extract(payload, '$.message_id') AS message_id
    FROM inbound WHERE endpoint = :endpoint AND json_extract(payload, '$.conversation') = :conversation
        AND arrival_at >= :since
    UNION ALL
    SELECT created_at, 1, id, 'bot', kind, text, NULL FROM outbox
    WHERE endpoint = :endpoint AND conversation = :conversation AND created_at >= :since AND state = 'sent'
)
WHERE (kind IN ('message', 'postback', 'reply', 'closure', 'bot') AND text IS NOT NULL) OR kind = 'refresh'
ORDER BY at DESC, side DESC, id DESC LIMIT :limit
"""


def select_history(
    conn: sqlite3.Connection, endpoint: str, conversation: str, since: float, limit: int
) -> list[TranscriptLine]:
    """A conversation's user and sent lines from ``since`` on, oldest first, the last ``limit``."""
    params = {"endpoint": endpoint, "conversation": conversation, "since": since, "limit": limit}
    lines = [
        TranscriptLine(at, sender, kind, text or "", message_id)
        for at, sender, kind, text, message_id in conn.execute(_HISTORY, params)
    ]
    lines.reverse()
    return lines
