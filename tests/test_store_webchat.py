"""Schema version 3 of the SQLite store, for the web chat in public, migrated in place into a
database of version 2. The behaviour of the new store methods (issued conversations, one
conversation's pending messages, the transcript) is tested on both backends in test_store.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.models import EventKind, InboundEvent, MessageKind, OutboundMessage
from gateway.store.sqlite import SqliteStore
from gateway.store.sqlite_schema import MIGRATIONS

T0 = 1_700_000_000.0


def message(conversation: str, key: str, text: str, at: float, *, channel: str = "webchat") -> OutboundMessage:
    return OutboundMessage(
        endpoint="web" if channel == "webchat" else "sl",
        channel=channel,
        conversation=conversation,
        kind=MessageKind.CLOSURE if key.startswith("close") else MessageKind.REPLY,
        text=text,
        key=key,
        created_at=at,
        next_attempt_at=at,
    )


def user_event(conversation: str, key: str, text: str | None, kind: EventKind = EventKind.MESSAGE) -> InboundEvent:
    return InboundEvent(conversation=conversation, kind=kind, dedup_key=key, message_id=key, text=text)


async def test_a_version_2_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    raw = sqlite3.connect(path, isolation_level=None)
    for statements in MIGRATIONS[:2]:  # migrations are append-only: this IS version 2
        for statement in statements:
            raw.execute(statement)
    raw.execute("PRAGMA user_version = 2")
    raw.execute(
        "INSERT INTO inbound (endpoint, dedup_key, payload, arrival_at, state) VALUES ('web', 'k1', ?, ?, 'done')",
        ('{"conversation":"c1","kind":"message","text":"from before","message_id":"k1"}', T0),
    )
    raw.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert [line.text for line in await store.history("web", "c1", T0, 10)] == ["from before"]
        assert await store.conversation_secret("web", "c1") is None
    finally:
        await store.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
