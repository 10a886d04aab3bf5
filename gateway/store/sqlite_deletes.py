"""What the SQLite store deletes beyond the writer's own pruning: history past its retention
(``SqliteStore.prune_history``), a contact on request (``erase_contact``) and a dead letter. Each
delete goes to the writer as one ``Exec`` write.

Retention goes in pairs of statements: the select finds candidates on the reader connection
with (cutoff, after, limit), so a scan never holds up a webhook's commit; the delete runs on the
writer with (JSON list of ids, cutoff) and checks the condition again, so a row that changed
meanwhile stays.
"""

from __future__ import annotations

from typing import Any

from gateway.models import contact_id_of

# Sessions: through sessions_by_start (a session closed before the cutoff started before it).
OLD_CLOSED_SESSIONS = "SELECT id FROM sessions WHERE started_at < ?1 AND state = 'closed' AND closed_at < ?1 LIMIT ?3"
DELETE_CLOSED_SESSIONS = (
    "DELETE FROM sessions WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'closed' AND closed_at < ?2"
)
# Contacts left with no session, silent since the cutoff; an opted-out contact stays (its opt-out
# must hold). Paged by id: most contacts are kept, and a page must not read them again.
_IDLE_CONTACT = (
    "c.opted_out = 0 AND coalesce(c.last_user_message_at, c.created_at) < ?{cutoff} "
    "AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.contact_id = c.id)"
)
IDLE_CONTACTS = (
    f"SELECT c.id FROM contacts c WHERE {_IDLE_CONTACT.format(cutoff=1)} AND c.id > ?2 ORDER BY c.id LIMIT ?3"
)
DELETE_IDLE_CONTACTS = (
    f"DELETE FROM contacts AS c WHERE c.id IN (SELECT value FROM json_each(?1)) AND {_IDLE_CONTACT.format(cutoff=2)}"
)
# Sent and skipped messages (their texts): through outbox_by_state, oldest ids first.
OLD_DONE_OUTBOX = (
    "SELECT id FROM outbox WHERE state IN ('sent', 'skipped') AND created_at < ?1 ORDER BY state, id LIMIT ?3"
)
DELETE_DONE_OUTBOX = (
    "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?1)) "
    "AND state IN ('sent', 'skipped') AND created_at < ?2"
)

DELETE_DEAD_LETTER = "DELETE FROM outbox WHERE id = ? AND state = 'dead'"

# The inbox has no conversation column; its pending rows are left to be handled.
_ERASE_INBOUND = (
    "DELETE FROM inbound WHERE endpoint = ? AND state = 'done' AND json_extract(payload, '$.conversation') = ?"
)


def erase_contact(endpoint: str, conversation: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The statements that erase a contact in one transaction: its sessions, the contact, its
    conversation's outbox messages and handled inbound events."""
    contact_id = contact_id_of(endpoint, conversation)
    return (
        ("DELETE FROM sessions WHERE contact_id = ?", (contact_id,)),
        ("DELETE FROM contacts WHERE id = ?", (contact_id,)),
        ("DELETE FROM outbox WHERE endpoint = ? AND conversation = ?", (endpoint, conversation)),
        (_ERASE_INBOUND, (endpoint, conversation)),
    )
