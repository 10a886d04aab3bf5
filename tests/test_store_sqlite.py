"""SqliteStore against real database files: round trips, dedup, group commit, locking, retention."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StoreError, StoreLocked
from gateway.models import (
    Change,
    CloseReason,
    Contact,
    EventKind,
    InboundEvent,
    MessageKind,
    OutboundMessage,
    OutboxState,
    Session,
    SessionState,
)
from gateway.store import sqlite as sqlite_module
from gateway.store import sqlite_rows, sqlite_writer
from gateway.store.base import SessionQuery, Store
from gateway.store.sqlite import SqliteStore
from gateway.store.sqlite_schema import MIGRATIONS

T0 = 1_700_000_000.123456789  # full float precision must survive the round trip


def fields(session: Session | None) -> dict[str, Any] | None:
    """A session's field values (sessions compare by identity)."""
    return None if session is None else dataclasses.asdict(session)


def make_session(
    n: int,
    *,
    endpoint: str = "web",
    conversation: str | None = None,
    started_at: float | None = None,
    state: SessionState = SessionState.OPEN,
) -> Session:
    start = T0 + n if started_at is None else started_at
    return Session(
        id=f"s{n:04d}",
        endpoint=endpoint,
        channel="webchat",
        conversation=f"c{n}" if conversation is None else conversation,
        started_at=start,
        last_activity_at=start,
        expires_at=start + 60,
        state=state,
        closed_at=None if state is SessionState.OPEN else start + 61,
        close_reason=None if state is SessionState.OPEN else CloseReason.INACTIVITY,
    )


def make_message(key: str, *, channel: str = "webchat", created_at: float = T0, text: str = "hi") -> OutboundMessage:
    return OutboundMessage(
        endpoint="web",
        channel=channel,
        conversation="c1",
        kind=MessageKind.REPLY,
        text=text,
        key=key,
        created_at=created_at,
    )


def make_event(key: str, conversation: str = "c1") -> InboundEvent:
    return InboundEvent(conversation=conversation, kind=EventKind.MESSAGE, dedup_key=key, text=f"text {key}")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "gateway.db"  # "data" does not exist yet: the store creates it


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(db_path)
    await opened.open()
    yield opened
    await opened.aclose()


async def reopen(store: SqliteStore, path: Path) -> SqliteStore:
    await store.aclose()
    fresh = SqliteStore(path)
    await fresh.open()
    return fresh


def test_models_and_columns_agree() -> None:
    """Every model field has a column, so a new field cannot be silently dropped."""
    assert {f.name for f in dataclasses.fields(Session)} <= set(sqlite_rows.SESSION_COLUMNS)
    assert {f.name for f in dataclasses.fields(Contact)} == set(sqlite_rows.CONTACT_COLUMNS)
    assert {f.name for f in dataclasses.fields(OutboundMessage)} == set(sqlite_rows.OUTBOX_COLUMNS)


async def test_open_creates_directory_and_current_schema(db_path: Path) -> None:
    store: Store = SqliteStore(db_path)  # also a static check: SqliteStore satisfies Store
    await store.open()
    try:
        with sqlite3.connect(db_path) as raw:
            assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        raw.close()
        assert db_path.with_name("gateway.db.lock").read_text().strip() == str(os.getpid())
    finally:
        await store.aclose()


async def test_newer_schema_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    raw.close()
    with pytest.raises(StoreError, match="newer"):
        await SqliteStore(db_path).open()
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA user_version = 0")
    raw.close()
    again = SqliteStore(db_path)  # the failed open released its lock
    await again.open()
    await again.aclose()


async def test_session_round_trip_every_field(store: SqliteStore, db_path: Path) -> None:
    full = Session(
        id="s-full",
        endpoint="fb-main",
        channel="messenger",
        conversation="psid:1",
        started_at=T0,
        last_activity_at=T0 + 1.5,
        expires_at=None,
        state=SessionState.CLOSED,
        interactive=False,
        developer=True,
        closed_at=T0 + 2.25,
        close_reason=CloseReason.ADMIN,
        notice="skipped: never interactive",
        message_count=7,
        intent="billing",
        variables={"plan": "pro", "n": 3, "nested": {"ok": True}},
        context={"tags": {"current": ["a"], "historic": ["b"]}, "sentiment": -0.5},
    )
    bare = make_session(1)
    bare.expires_at = T0 + 1800.000001
    await store.commit(Change(sessions=[full, bare]))
    assert fields(await store.get_session("s-full")) == fields(full)
    assert fields(await store.get_session(bare.id)) == fields(bare)
    assert await store.get_session("nope") is None
    store = await reopen(store, db_path)
    try:
        assert fields(await store.get_session("s-full")) == fields(full)
        assert fields(await store.get_session(bare.id)) == fields(bare)
    finally:
        await store.aclose()


async def test_contact_round_trip_and_update(store: SqliteStore) -> None:
    contact = Contact(
        id="web:c1",
        endpoint="web",
        conversation="c1",
        created_at=T0,
        display_name="Ada",
        opted_out=True,
        last_user_message_at=T0 + 5,
        variables={"vip": {"value": True, "expires_at": T0 + 86400}},
        auth_profiles={"crm": {"token": "t"}},
    )
    await store.commit(Change(contacts=[contact]))
    assert await store.get_contact("web:c1") == contact
    contact.opted_out = False
    contact.display_name = None
    await store.commit(Change(contacts=[contact]))
    assert await store.get_contact("web:c1") == contact
    assert await store.get_contact("web:nobody") is None


async def test_concurrent_contact_reads_each_get_their_own_answer(store: SqliteStore) -> None:
    # Reads asked for together go to the database as one query (SqliteStore.get_contact).
    contacts = [
        Contact(id=f"web:c{i}", endpoint="web", conversation=f"c{i}", created_at=T0, variables={"n": {"value": i}})
        for i in range(50)
    ]
    await store.commit(Change(contacts=contacts))
    wanted = [c.id for c in contacts] + ["web:nobody", "web:c7", "web:c7"]
    found = await asyncio.gather(*(store.get_contact(contact_id) for contact_id in wanted))
    assert found[:50] == contacts
    assert found[50] is None
    first, second, third = found[7], found[51], found[52]
    assert first == second == third == contacts[7]
    assert first is not second and second is not third  # callers change their contact: never shared
    assert second is not None and third is not None
    second.variables["n"]["value"] = -1
    assert third.variables["n"]["value"] == 7


async def test_a_contact_read_that_fails_fails_every_caller(store: SqliteStore) -> None:
    reads = [asyncio.ensure_future(store.get_contact(f"web:c{i}")) for i in range(3)]
    await asyncio.sleep(0)  # asked for; the query starts on the next loop iteration
    await store.aclose()
    outcomes = await asyncio.gather(*reads, return_exceptions=True)
    assert all(isinstance(outcome, StoreError) for outcome in outcomes)
    assert len({id(outcome) for outcome in outcomes}) == 3


async def test_get_contacts_returns_those_that_exist(store: SqliteStore) -> None:
    contacts = [Contact(id=f"web:c{i}", endpoint="web", conversation=f"c{i}", created_at=T0 + i) for i in range(3000)]
    await store.commit(Change(contacts=contacts))
    wanted = [f"web:c{i}" for i in range(0, 3000, 3)] + ["web:nobody", "web:c0"]
    found = await store.get_contacts(wanted)
    assert found == {c.id: c for c in contacts[::3]}
    assert await store.get_contacts([]) == {}


async def test_outbound_round_trip_and_updates(store: SqliteStore) -> None:
    message = OutboundMessage(
        endpoint="line-jp",
        channel="line",
        conversation="U1",
        kind=MessageKind.CLOSURE,
        text="bye ✓",
        key="close:s1",
        created_at=T0,
        session_id="s1",
        reply_token="rt",
        reply_token_expires_at=T0 + 60,
        user_last_seen_at=T0 - 10,
        attempts=1,
        next_attempt_at=T0 + 0.5,
        last_error="timeout",
    )
    await store.commit(Change(outbox=[message]))
    assert message.id > 0
    assert await store.get_outbound(message.id) == message
    assert await store.pending_outbox() == [message]

    message.state = OutboxState.DEAD
    message.attempts = 5
    message.next_attempt_at = T0 + 99
    message.last_error = "HTTP 400"
    message.sent_at = T0 + 3
    await store.commit(Change(outbox_updates=[message]))
    assert await store.get_outbound(message.id) == message
    assert await store.pending_outbox() == []
    assert await store.dead_letters() == [message]
    assert await store.get_outbound(message.id + 1000) is None


async def test_dead_letters_newest_first_and_limited(store: SqliteStore) -> None:
    messages = [make_message(f"k{i}") for i in range(3)]
    await store.commit(Change(outbox=messages))
    for m in messages:
        m.state = OutboxState.DEAD
    await store.commit(Change(outbox_updates=messages))
    assert [m.key for m in await store.dead_letters()] == ["k2", "k1", "k0"]
    assert [m.key for m in await store.dead_letters(limit=1)] == ["k2"]


async def test_outbox_key_is_idempotent(store: SqliteStore) -> None:
    first = make_message("reply:1:0", text="first")
    await store.commit(Change(outbox=[first]))
    again = make_message("reply:1:0", text="second")
    await store.commit(Change(outbox=[again]))
    assert again.id == first.id
    assert (await store.get_outbound(first.id)) == first

    # The same key twice in one batch (and twice in one Change): one row, one id.
    a, b, c = make_message("close:x"), make_message("close:x"), make_message("close:x")
    await asyncio.gather(store.commit(Change(outbox=[a])), store.commit(Change(outbox=[b, c])))
    assert a.id == b.id == c.id != first.id
    assert [m.key for m in await store.pending_outbox()] == ["reply:1:0", "close:x"]


async def test_inbound_dedup_survives_reopen(store: SqliteStore, db_path: Path) -> None:
    event = InboundEvent(
        conversation="U1",
        kind=EventKind.MESSAGE,
        dedup_key="evt-1",
        message_id="m-1",
        text=None,
        attachments=({"type": "image", "url": "https://x/y.png"}, {"type": "sticker", "id": 5}),
        timestamp=T0 - 1,
        reply_token="rt-1",
        reply_token_expires_at=T0 + 60,
        sender_name="Ada",
    )
    stored = await store.add_inbound("line-jp", event, T0)
    assert stored is not None and stored.id > 0
    assert (stored.endpoint, stored.arrival_at, stored.event) == ("line-jp", T0, event)
    assert await store.add_inbound("line-jp", event, T0 + 1) is None  # redelivery
    other = await store.add_inbound("line-us", event, T0 + 1)  # same key, other endpoint
    assert other is not None and other.id != stored.id

    store = await reopen(store, db_path)
    try:
        assert await store.add_inbound("line-jp", event, T0 + 2) is None
        assert await store.pending_inbound() == [stored, other]
    finally:
        await store.aclose()


async def test_pending_inbound_order_and_done_marking(store: SqliteStore) -> None:
    added = [await store.add_inbound("web", make_event(f"e{i}"), T0 + i) for i in range(5)]
    ids = [e.id for e in added if e is not None]
    assert ids == sorted(ids) and len(ids) == 5
    await store.commit(Change(handled_events=[ids[0], ids[3]]))
    assert [e.id for e in await store.pending_inbound()] == [ids[1], ids[2], ids[4]]
    assert await store.add_inbound("web", make_event("e0"), T0 + 9) is None  # done is still deduplicated


async def test_duplicate_events_in_one_batch(store: SqliteStore) -> None:
    results = await asyncio.gather(*(store.add_inbound("web", make_event("same"), T0) for _ in range(3)))
    assert sum(r is not None for r in results) == 1
    assert results[0] is not None  # the first in queue order wins
    assert len(await store.pending_inbound()) == 1


async def test_an_added_event_carries_its_contact_as_of_the_commit(store: SqliteStore) -> None:
    known = Contact(id="web:c1", endpoint="web", conversation="c1", created_at=T0, auth_profiles={"crm": {"t": 1}})
    await store.commit(Change(contacts=[known]))
    changed = dataclasses.replace(known, auth_profiles={})
    # Queued together: the contact change before the second event is in what that event sees.
    first, _, second, stranger = await asyncio.gather(
        store.add_inbound("web", make_event("e1"), T0),
        store.commit(Change(contacts=[changed])),
        store.add_inbound("web", make_event("e2"), T0),
        store.add_inbound("web", make_event("e3", conversation="c2"), T0),
    )
    assert first is not None and second is not None and stranger is not None
    assert first.contact_known and second.contact_known and stranger.contact_known
    assert first.contact == second.contact == changed  # as the batch commits, whatever the order
    assert first.contact is not second.contact  # one object per event: turns change them
    assert stranger.contact is None  # nobody there yet
    # Events read back at a restart carry none: the turn reads the contact itself.
    assert all(not stored.contact_known for stored in await store.pending_inbound())


async def test_one_open_session_per_conversation(store: SqliteStore) -> None:
    first = make_session(1, conversation="shared")
    second = make_session(2, conversation="shared")
    other = make_session(3)
    before = store.batches_committed
    outcomes = await asyncio.gather(
        store.commit(Change(sessions=[first])),
        store.commit(
            Change(
                sessions=[second],
                outbox=[make_message("close:s0002")],
                contacts=[Contact(id="web:shared", endpoint="web", conversation="shared", created_at=T0)],
            )
        ),
        store.commit(Change(sessions=[other])),
        return_exceptions=True,
    )
    assert store.batches_committed == before + 1  # one batch; only the bad change failed
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], StoreError)
    assert fields(await store.get_session(first.id)) == fields(first)
    assert fields(await store.get_session(other.id)) == fields(other)
    # The failed change is rolled back as a whole.
    assert await store.get_session(second.id) is None
    assert await store.pending_outbox() == []
    assert await store.get_contact("web:shared") is None

    # Closing the open one and opening the next, in one change or two queued together, is fine.
    first.state, first.closed_at, first.close_reason = SessionState.CLOSED, T0 + 70, CloseReason.REFRESH
    third = make_session(4, conversation="shared")
    await asyncio.gather(store.commit(Change(sessions=[first])), store.commit(Change(sessions=[second])))
    assert fields(await store.get_session(second.id)) == fields(second)
    assert fields(await store.get_session(first.id)) == fields(first)
    second.state, second.closed_at, second.close_reason = SessionState.CLOSED, T0 + 80, CloseReason.FLOW
    await store.commit(Change(sessions=[second, third]))
    assert [s.id for s in await store.contact_sessions("web:shared")] == [third.id, second.id, first.id]


async def test_closed_session_stays_closed(store: SqliteStore) -> None:
    session = make_session(1)
    stale = dataclasses.replace(session)
    session.state, session.closed_at, session.close_reason = SessionState.CLOSED, T0 + 5, CloseReason.ADMIN
    await store.commit(Change(sessions=[session]))
    stale.message_count = 9
    await store.commit(Change(sessions=[stale]))
    assert fields(await store.get_session(session.id)) == fields(session)


async def test_a_batch_applies_changes_in_order(store: SqliteStore) -> None:
    a, b = make_session(1), make_session(2)
    a.notice = b.notice = "queued"
    await store.commit(Change(sessions=[a, b]))
    # a: a notice, then an upsert carrying the older notice; b: the other way round.
    a_old = dataclasses.replace(a)
    b.message_count = 2
    c1, c2 = dataclasses.replace(a, message_count=1), dataclasses.replace(a, message_count=3)
    await asyncio.gather(
        store.commit(Change(notices=[(a.id, "sent")])),
        store.commit(Change(sessions=[a_old])),
        store.commit(Change(sessions=[b])),
        store.commit(Change(notices=[(b.id, "failed: HTTP 500")])),
        store.commit(Change(sessions=[c1])),
        store.commit(Change(sessions=[c2])),
    )
    got_a, got_b = await store.get_session(a.id), await store.get_session(b.id)
    assert got_a is not None and got_b is not None
    assert (got_a.notice, got_a.message_count) == ("queued", 3)
    assert (got_b.notice, got_b.message_count) == ("failed: HTTP 500", 2)


async def test_concurrent_commits_are_group_committed_and_durable(store: SqliteStore, db_path: Path) -> None:
    sessions = [make_session(i) for i in range(500)]
    before = store.batches_committed
    await asyncio.gather(
        *(store.commit(Change(sessions=[s], outbox=[make_message(f"reply:{s.id}")])) for s in sessions)
    )
    batches = store.batches_committed - before
    assert 1 <= batches < 500
    store = await reopen(store, db_path)
    try:
        for s in sessions:
            assert fields(await store.get_session(s.id)) == fields(s)
        assert len(await store.pending_outbox()) == 500
        assert sorted([s.id async for s in store.open_sessions()]) == sorted(s.id for s in sessions)
    finally:
        await store.aclose()


async def test_bad_changes_fail_alone(store: SqliteStore) -> None:
    unserialisable = make_session(1)
    unserialisable.variables = {"x": object()}
    with pytest.raises(StoreError):
        await store.commit(Change(sessions=[unserialisable]))

    not_a_number = make_session(2)
    not_a_number.last_activity_at = math.nan  # no JSON form: fails inside the batch
    good = [make_session(i) for i in range(3, 9)]
    outcomes = await asyncio.gather(
        *(store.commit(Change(sessions=[s])) for s in good[:3]),
        store.commit(Change(sessions=[not_a_number])),
        *(store.commit(Change(sessions=[s])) for s in good[3:]),
        return_exceptions=True,
    )
    assert [type(o) for o in outcomes] == [type(None)] * 3 + [StoreError] + [type(None)] * 3
    assert [s.id async for s in store.open_sessions()] == [s.id for s in good]


async def test_list_sessions_filters_and_pages(store: SqliteStore) -> None:
    sessions = [
        make_session(
            i, endpoint="web" if i % 2 else "slack", state=SessionState.CLOSED if i % 3 == 0 else SessionState.OPEN
        )
        for i in range(10)
    ]
    sessions += [make_session(i, started_at=T0 + 4) for i in (10, 11)]  # ties on started_at: id breaks them
    await store.commit(Change(sessions=sessions))

    def expected(keep: Any) -> list[str]:
        return [s.id for s in sorted(sessions, key=lambda s: (s.started_at, s.id), reverse=True) if keep(s)]

    async def all_pages(query: SessionQuery) -> list[str]:
        ids: list[str] = []
        while True:
            page, cursor = await store.list_sessions(query)
            assert len(page) <= query.limit
            ids += [s.id for s in page]
            if cursor is None:
                return ids
            query = dataclasses.replace(query, cursor=cursor)

    assert await all_pages(SessionQuery(limit=3)) == expected(lambda s: True)
    assert await all_pages(SessionQuery(limit=100)) == expected(lambda s: True)
    assert await all_pages(SessionQuery(state=SessionState.OPEN, limit=2)) == expected(lambda s: s.is_open)
    assert await all_pages(SessionQuery(endpoint="slack", limit=2)) == expected(lambda s: s.endpoint == "slack")
    assert await all_pages(SessionQuery(state=SessionState.CLOSED, endpoint="slack", limit=1)) == expected(
        lambda s: s.endpoint == "slack" and not s.is_open
    )
    page, cursor = await store.list_sessions(SessionQuery(limit=len(sessions)))
    assert len(page) == len(sessions) and cursor is None
    with pytest.raises(ValueError):
        await store.list_sessions(SessionQuery(cursor="not a cursor"))


async def test_contact_sessions_newest_first(store: SqliteStore) -> None:
    history = [make_session(i, conversation="u1", state=SessionState.CLOSED) for i in (3, 1, 2)]
    current = make_session(9, conversation="u1")
    stranger = make_session(5, conversation="u2")
    await store.commit(Change(sessions=[*history, current, stranger]))
    assert [s.id for s in await store.contact_sessions("web:u1")] == ["s0009", "s0003", "s0002", "s0001"]
    assert await store.contact_sessions("web:nobody") == []


async def test_open_sessions_streams_every_open_session(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "READ_CHUNK", 3)
    sessions = [make_session(i, state=SessionState.CLOSED if i in (4, 7) else SessionState.OPEN) for i in range(11)]
    sessions.append(make_session(11, started_at=T0 + 2))
    await store.commit(Change(sessions=sessions))
    streamed = [s async for s in store.open_sessions()]
    expected = sorted((s for s in sessions if s.is_open), key=lambda s: (s.endpoint, s.conversation))
    assert [fields(s) for s in streamed] == [fields(s) for s in expected]


async def test_overrides(store: SqliteStore, db_path: Path) -> None:
    assert await store.get_overrides() == {}
    await store.put_override("endpoint:web", {"expiration_minutes": 5})
    await store.put_override("organisation", {"expiration_minutes": 60, "mode": "lazy"})
    await store.put_override("endpoint:web", {"expiration_minutes": 7.5})
    await store.delete_override("endpoint:absent")
    store = await reopen(store, db_path)
    try:
        assert await store.get_overrides() == {
            "endpoint:web": {"expiration_minutes": 7.5},
            "organisation": {"expiration_minutes": 60, "mode": "lazy"},
        }
        await store.delete_override("organisation")
        assert await store.get_overrides() == {"endpoint:web": {"expiration_minutes": 7.5}}
    finally:
        await store.aclose()


async def test_prune(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_writer, "PRUNE_CHUNK", 2)  # several rounds
    cutoff = T0 + 100
    old_done = [await store.add_inbound("web", make_event(f"old{i}"), T0 + i) for i in range(5)]
    old_pending = await store.add_inbound("web", make_event("old-pending"), T0)
    new_done = await store.add_inbound("web", make_event("new"), cutoff + 1)
    handled = [e.id for e in (*old_done, new_done) if e is not None]
    kept_web_old = make_message("w-old", created_at=T0)
    kept_web_new = make_message("w-new", created_at=cutoff + 1)
    sent_web_old = make_message("w-sent", created_at=T0)
    other_old = make_message("m-old", channel="messenger", created_at=T0)
    await store.commit(Change(handled_events=handled, outbox=[kept_web_old, kept_web_new, sent_web_old, other_old]))
    sent_web_old.state, sent_web_old.sent_at = OutboxState.SENT, T0 + 1
    await store.commit(Change(outbox_updates=[sent_web_old]))

    assert await store.prune(cutoff, holding_channels={"webchat"}) == 6
    assert await store.prune(cutoff, holding_channels={"webchat"}) == 0
    assert [e.event.dedup_key for e in await store.pending_inbound()] == ["old-pending"]
    assert old_pending is not None
    assert await store.add_inbound("web", make_event("old0"), cutoff) is not None  # its dedup id is gone
    assert await store.add_inbound("web", make_event("new"), cutoff) is None  # this one is kept
    assert [m.key for m in await store.pending_outbox()] == ["w-new", "m-old"]
    assert await store.get_outbound(sent_web_old.id) == sent_web_old


async def test_aclose_flushes_queued_writes_and_is_idempotent(store: SqliteStore, db_path: Path) -> None:
    sessions = [make_session(i) for i in range(50)]
    writes = [asyncio.ensure_future(store.commit(Change(sessions=[s]))) for s in sessions]
    await asyncio.sleep(0)  # the writes are queued, not yet committed
    await asyncio.gather(store.aclose(), store.aclose())
    await store.aclose()
    await asyncio.gather(*writes)  # every queued write succeeded
    with pytest.raises(StoreError):
        await store.commit(Change(sessions=[make_session(99)]))
    with pytest.raises(StoreError):
        await store.get_session("s0001")
    store = await reopen(store, db_path)
    try:
        assert len([s async for s in store.open_sessions()]) == 50
    finally:
        await store.aclose()


async def test_second_store_in_same_process_is_refused(store: SqliteStore, db_path: Path) -> None:
    with pytest.raises(StoreLocked) as refused:
        await SqliteStore(db_path).open()
    assert str(db_path) in str(refused.value)
    assert f"pid {os.getpid()}" in str(refused.value)
    await store.aclose()
    after = SqliteStore(db_path)
    await after.open()
    await after.aclose()


PROBE = """
import asyncio, sys
from pathlib import Path
from gateway.errors import StoreLocked
from gateway.store.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(Path(sys.argv[1]))
    try:
        await store.open()
    except StoreLocked as exc:
        print("locked:", exc, flush=True)
        return
    print("opened", flush=True)
    if sys.argv[2] == "hold":
        await asyncio.sleep(60)
    await store.aclose()

asyncio.run(main())
"""


async def start_probe(path: Path, mode: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, str(path), mode, stdout=asyncio.subprocess.PIPE
    )


async def probe(path: Path) -> str:
    proc = await start_probe(path, "exit")
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return out.decode().strip()


async def test_other_process_is_refused_while_open(store: SqliteStore, db_path: Path) -> None:
    outcome = await probe(db_path)
    assert outcome == f"locked: database {db_path} is in use by another gateway process (pid {os.getpid()})"
    await store.aclose()
    assert await probe(db_path) == "opened"


async def test_lock_of_a_killed_process_is_released(db_path: Path) -> None:
    holder = await start_probe(db_path, "hold")
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), timeout=60)
        assert line.decode().strip() == "opened"
        with pytest.raises(StoreLocked, match=f"pid {holder.pid}"):
            await SqliteStore(db_path).open()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        await holder.wait()
    store = SqliteStore(db_path)
    await store.open()
    await store.aclose()
