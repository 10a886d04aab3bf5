"""Schema version 3 of the SQLite store, for the web chat in public: issued conversations and
their secret hashes (pruned when never used), one conversation's pending messages, pending
messages without the holding channels, a conversation's transcript; migrated in place into a
database of version 2."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.models import Change, EventKind, InboundEvent, MessageKind, OutboundMessage, OutboxState, Session
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


async def test_conversation_secrets_persist_and_unused_ones_are_pruned(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gateway.db")
    await store.open()
    try:
        await store.add_conversation_secret("web", "used", "h1", T0)
        await store.add_conversation_secret("web", "unused", "h2", T0)
        await store.add_conversation_secret("web", "recent", "h3", T0 + 100)
        session = Session("s1", "web", "webchat", "used", T0, T0, None)
        await store.commit(Change(sessions=[session]))
        await store.prune(T0 + 50, holding_channels=["webchat"])
        assert await store.conversation_secret("web", "used") == "h1"  # it had a session
        assert await store.conversation_secret("web", "unused") is None  # nobody ever wrote
        assert await store.conversation_secret("web", "recent") == "h3"  # not old enough
        assert await store.conversation_secret("other", "used") is None
    finally:
        await store.aclose()
    reopened = SqliteStore(tmp_path / "gateway.db")
    await reopened.open()
    try:
        assert await reopened.conversation_secret("web", "used") == "h1"
    finally:
        await reopened.aclose()


async def test_pending_messages_of_one_conversation_and_without_the_holding_channels(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gateway.db")
    await store.open()
    try:
        kept = [message("c1", f"reply:{n}", f"t{n}", T0 + n) for n in range(3)]
        other = message("c2", "reply:9", "other", T0)
        slack = message("C1", "reply:s", "slack", T0, channel="slack")
        await store.commit(Change(outbox=[*kept, other, slack]))
        kept[1].state = OutboxState.SENT
        await store.commit(Change(outbox_updates=[kept[1]]))
        assert [m.text for m in await store.pending_outbox_of("web", "c1")] == ["t0", "t2"]
        assert [m.text for m in await store.pending_outbox(skip_channels=["webchat"])] == ["slack"]
        assert len(await store.pending_outbox()) == 4
    finally:
        await store.aclose()


async def test_the_transcript_is_user_lines_and_sent_messages_from_a_time_on(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gateway.db")
    await store.open()
    try:
        await store.add_inbound("web", user_event("c1", "old", "before the session"), T0 - 10)
        await store.add_inbound("web", user_event("c1", "u1", "hello"), T0)
        await store.add_inbound("web", user_event("c1", "img", None), T0 + 1)  # no text: not a line
        await store.add_inbound("web", user_event("c1", "r", None, EventKind.REFRESH), T0 + 2)
        await store.add_inbound("web", user_event("c1", "u2", "again"), T0 + 3)
        await store.add_inbound("web", user_event("c2", "x", "someone else"), T0 + 1)
        replies = [message("c1", "reply:1", "hello", T0 + 0.5), message("c1", "close:s", "bye", T0 + 4)]
        unsent = message("c1", "reply:2", "not yet", T0 + 3.5)
        await store.commit(Change(outbox=[*replies, unsent]))
        for sent in replies:
            sent.state = OutboxState.SENT
        await store.commit(Change(outbox_updates=replies))
        lines = await store.history("web", "c1", T0, 10)
        assert [(line.sender, line.kind, line.text, line.message_id) for line in lines] == [
            ("user", "message", "hello", "u1"),
            ("bot", "reply", "hello", None),
            ("user", "refresh", "", "r"),
            ("user", "message", "again", "u2"),
            ("bot", "closure", "bye", None),
        ]
        assert [line.text for line in await store.history("web", "c1", T0, 2)] == ["again", "bye"]  # the last 2
    finally:
        await store.aclose()
