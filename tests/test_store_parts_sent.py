"""Schema version 2 of the SQLite store: the outbox's ``parts_sent`` column, migrated in place
into a database of version 1. Its narrow write (``record_parts_sent``) is tested on both
backends in test_store.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.models import MessageKind, OutboundMessage
from gateway.store.sqlite import SqliteStore
from gateway.store.sqlite_schema import MIGRATIONS

T0 = 1_700_000_000.5


def message(key: str) -> OutboundMessage:
    return OutboundMessage(
        endpoint="sl",
        channel="slack",
        conversation="C1",
        kind=MessageKind.REPLY,
        text="a long text",
        key=key,
        created_at=T0,
        next_attempt_at=T0,
    )


def version_1_database(path: Path) -> None:
    """A database as a gateway of schema version 1 left it, with one pending and one sent message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        raw.execute("PRAGMA journal_mode = WAL")
        for statement in MIGRATIONS[0]:  # migrations are append-only: this IS version 1
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 1")
        insert = (
            "INSERT INTO outbox (key, endpoint, channel, conversation, kind, text, created_at, state, attempts,"
            " next_attempt_at) VALUES (?, 'sl', 'slack', 'C1', 'reply', ?, ?, ?, ?, ?)"
        )
        raw.execute(insert, ("reply:1:0", "pending text", T0, "pending", 2, T0 + 5))
        raw.execute(insert, ("reply:2:0", "sent text", T0, "sent", 1, T0))
    finally:
        raw.close()


def schema_of(path: Path) -> tuple[int, list[str]]:
    raw = sqlite3.connect(path)
    try:
        version = int(raw.execute("PRAGMA user_version").fetchone()[0])
        columns = [row[1] for row in raw.execute("PRAGMA table_info(outbox)")]
    finally:
        raw.close()
    return version, columns


async def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "data" / "gateway.db"
    version_1_database(path)
    version, columns = schema_of(path)
    assert version == 1 and "parts_sent" not in columns

    store = SqliteStore(path)
    await store.open()
    try:
        version, columns = schema_of(path)
        assert version == len(MIGRATIONS) >= 2  # upgraded to the newest, through version 2
        assert columns[-1] == "parts_sent"
        [pending] = await store.pending_outbox()  # the old rows are all there, starting at part 0
        assert (pending.key, pending.text, pending.attempts, pending.next_attempt_at) == (
            "reply:1:0",
            "pending text",
            2,
            T0 + 5,
        )
        assert pending.parts_sent == 0
        await store.record_parts_sent(pending.id, 1)
    finally:
        await store.aclose()

    again = SqliteStore(path)  # a second open finds the newest version and migrates nothing
    await again.open()
    try:
        [pending] = await again.pending_outbox()
        assert pending.parts_sent == 1
        assert schema_of(path)[0] == len(MIGRATIONS)
    finally:
        await again.aclose()
