"""The store contract, against both backends: a real SQLite file and the machine's Redis (a key
prefix of the test's own). The ``store`` fixture is parametrised, so every test taking it shows
that SQLite and Redis behave alike; tests of one backend's own machinery (the SQLite file, its
lock and group commit) take ``sqlite_store``."""

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
    TranscriptEntry,
)
from gateway.session_rules import close_session
from gateway.store import redis_lifecycle, redis_reads, sqlite_rows, sqlite_writer
from gateway.store import sqlite as sqlite_module
from gateway.store.base import SessionQuery, Store
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SqliteStore
from gateway.store.sqlite_schema import MIGRATIONS
from tests.redis_kit import REDIS_URL

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
async def sqlite_store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(db_path)
    await opened.open()
    yield opened
    await opened.aclose()


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Store]:
    """The store under test: a SQLite file, or Redis under a prefix of this test's own."""
    opened: Store
    if request.param == "sqlite":
        opened = SqliteStore(db_path)
    else:
        opened = RedisStore(REDIS_URL, request.getfixturevalue("redis_prefix"))
    await opened.open()
    yield opened
    await opened.aclose()


async def reopen(store: Store, path: Path) -> Store:
    """Close ``store`` and open the same data again (file or key prefix)."""
    await store.aclose()
    fresh: Store = RedisStore(store.url, store.keys.prefix) if isinstance(store, RedisStore) else SqliteStore(path)
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


async def test_session_round_trip_every_field(store: Store, db_path: Path) -> None:
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


async def test_an_open_session_restores_with_every_field(store: Store) -> None:
    """Restore reads fewer columns than ``get_session`` (SQLite): what it builds is the same."""
    full = Session(
        id="s-open",
        endpoint="fb-main",
        channel="messenger",
        conversation="psid:2",
        started_at=T0,
        last_activity_at=T0 + 1.5,
        expires_at=T0 + 1801.5,
        interactive=False,
        developer=True,
        message_count=7,
        intent="billing",
        variables={"plan": "pro", "n": 3},
        context={"tags": {"current": ["a"]}, "sentiment": -0.5},
    )
    closed = make_session(2)
    closed.state, closed.closed_at, closed.close_reason = SessionState.CLOSED, T0 + 5, CloseReason.ADMIN
    await store.commit(Change(sessions=[full, make_session(1), closed]))
    restored = {s.id: s async for chunk in store.open_sessions() for s in chunk}
    assert sorted(restored) == sorted(["s-open", make_session(1).id])
    assert fields(restored["s-open"]) == fields(full)
    assert fields(restored[make_session(1).id]) == fields(make_session(1))


async def test_contact_round_trip_and_update(store: Store) -> None:
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


async def test_concurrent_contact_reads_each_get_their_own_answer(store: Store) -> None:
    # On SQLite, reads asked for together go to the database as one query (SqliteStore.get_contact).
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


async def test_a_contact_read_that_fails_fails_every_caller(sqlite_store: SqliteStore) -> None:
    reads = [asyncio.ensure_future(sqlite_store.get_contact(f"web:c{i}")) for i in range(3)]
    await asyncio.sleep(0)  # asked for; the query starts on the next loop iteration
    await sqlite_store.aclose()
    outcomes = await asyncio.gather(*reads, return_exceptions=True)
    assert all(isinstance(outcome, StoreError) for outcome in outcomes)
    assert len({id(outcome) for outcome in outcomes}) == 3


async def test_get_contacts_returns_those_that_exist(store: Store) -> None:
    contacts = [Contact(id=f"web:c{i}", endpoint="web", conversation=f"c{i}", created_at=T0 + i) for i in range(3000)]
    await store.commit(Change(contacts=contacts))
    wanted = [f"web:c{i}" for i in range(0, 3000, 3)] + ["web:nobody", "web:c0"]
    found = await store.get_contacts(wanted)
    assert found == {c.id: c for c in contacts[::3]}
    assert await store.get_contacts([]) == {}


async def test_outbound_round_trip_and_updates(store: Store) -> None:
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


async def test_dead_letters_newest_first_and_limited(store: Store) -> None:
    messages = [make_message(f"k{i}") for i in range(3)]
    await store.commit(Change(outbox=messages))
    for m in messages:
        m.state = OutboxState.DEAD
    await store.commit(Change(outbox_updates=messages))
    assert [m.key for m in await store.dead_letters()] == ["k2", "k1", "k0"]
    assert [m.key for m in await store.dead_letters(limit=1)] == ["k2"]


async def test_outbox_key_is_idempotent(store: Store) -> None:
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


async def test_inbound_dedup_survives_reopen(store: Store, db_path: Path) -> None:
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


async def test_pending_inbound_order_and_done_marking(store: Store) -> None:
    added = [await store.add_inbound("web", make_event(f"e{i}"), T0 + i) for i in range(5)]
    ids = [e.id for e in added if e is not None]
    assert ids == sorted(ids) and len(ids) == 5
    await store.commit(Change(handled_events=[ids[0], ids[3]]))
    assert [e.id for e in await store.pending_inbound()] == [ids[1], ids[2], ids[4]]
    assert await store.add_inbound("web", make_event("e0"), T0 + 9) is None  # done is still deduplicated


async def test_duplicate_events_in_one_batch(store: Store) -> None:
    results = await asyncio.gather(*(store.add_inbound("web", make_event("same"), T0) for _ in range(3)))
    assert sum(r is not None for r in results) == 1
    assert results[0] is not None  # the first in queue order wins
    assert len(await store.pending_inbound()) == 1


async def test_an_added_event_carries_its_contact_as_of_the_commit(sqlite_store: SqliteStore) -> None:
    store = sqlite_store  # SQLite reads the contact in the inbox commit; other stores may not
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


async def test_one_open_session_per_conversation(store: Store) -> None:
    first = make_session(1, conversation="shared")
    second = make_session(2, conversation="shared")
    other = make_session(3)
    before = store.batches_committed if isinstance(store, SqliteStore) else 0
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
    if isinstance(store, SqliteStore):
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


async def test_closed_session_stays_closed(store: Store) -> None:
    session = make_session(1)
    stale = dataclasses.replace(session)
    session.state, session.closed_at, session.close_reason = SessionState.CLOSED, T0 + 5, CloseReason.ADMIN
    await store.commit(Change(sessions=[session]))
    stale.message_count = 9
    await store.commit(Change(sessions=[stale]))
    assert fields(await store.get_session(session.id)) == fields(session)


async def test_a_batch_applies_changes_in_order(store: Store) -> None:
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


async def test_closes_committed_together_keep_their_own_columns(store: Store) -> None:
    """Closes of one group commit, as a batch of due sessions and concurrent closes give them:
    each session keeps its own closed_at, reason, notice and deadline, and of two closes of one
    session the first committed wins."""
    sessions = [make_session(n) for n in range(1, 7)]
    await store.commit(Change(sessions=sessions))
    closes: list[Change] = []
    for n, session in enumerate(sessions):
        closing = dataclasses.replace(session, expires_at=T0 + 30 + n)  # each its own deadline
        close_session(closing, CloseReason.INACTIVITY if n < 4 else CloseReason.ADMIN, T0 + (40 if n < 3 else 50))
        closing.notice = "none" if n % 2 else "queued"
        closes.append(Change(closes=[closing]))
    again = dataclasses.replace(closes[0].closes[0])
    close_session(again, CloseReason.ADMIN, T0 + 70)
    await asyncio.gather(*(store.commit(change) for change in [*closes, Change(closes=[again])]))
    for change in closes:
        [expected] = change.closes
        assert fields(await store.get_session(expected.id)) == fields(expected)


async def test_concurrent_commits_are_group_committed_and_durable(store: Store, db_path: Path) -> None:
    sessions = [make_session(i) for i in range(500)]
    before = store.batches_committed if isinstance(store, SqliteStore) else 0
    await asyncio.gather(
        *(store.commit(Change(sessions=[s], outbox=[make_message(f"reply:{s.id}")])) for s in sessions)
    )
    if isinstance(store, SqliteStore):
        batches = store.batches_committed - before
        assert 1 <= batches < 500
    store = await reopen(store, db_path)
    try:
        for s in sessions:
            assert fields(await store.get_session(s.id)) == fields(s)
        assert len(await store.pending_outbox()) == 500
        assert sorted([s.id async for chunk in store.open_sessions() for s in chunk]) == sorted(s.id for s in sessions)
    finally:
        await store.aclose()


def test_inbox_payload_keeps_what_only_the_standard_library_writes() -> None:
    """The inbox payload is written with orjson; an integer past 64 bits in an attachment (a
    platform's JSON may carry one) falls back to the standard library and reads back the same."""
    event = InboundEvent(conversation="c", kind=EventKind.MESSAGE, dedup_key="d", attachments=({"size": 10**30},))
    assert sqlite_rows.event_from_json(sqlite_rows.event_to_json(event)) == event


async def test_a_queued_commit_is_applied_when_its_waiter_is_cancelled(sqlite_store: SqliteStore) -> None:
    """SqliteStore.commit queues the write before it returns and hands back the writer's future:
    cancelling the task that awaits it (a shutdown) while the write still waits in the queue
    must not lose it. gateway.outbox_outcomes._record relies on this for a "sent" mark instead of a shield task."""
    # The writer is busy with a big batch on its thread while the small write waits in the queue.
    big = sqlite_store.commit(Change(sessions=[make_session(i) for i in range(100, 20100)]))
    await asyncio.sleep(0)
    session = make_session(1)
    pending = sqlite_store.commit(Change(sessions=[session]))
    assert isinstance(pending, asyncio.Future)

    async def wait() -> None:
        await pending

    waiter = asyncio.create_task(wait())
    await asyncio.sleep(0)  # the waiter is suspended on the queued write now
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pending.cancelled()
    await big
    await sqlite_store.commit(Change())  # a later write: the batch before it has committed
    stored = await sqlite_store.get_session(session.id)
    assert stored is not None and stored.id == session.id


async def test_bad_changes_fail_alone(store: Store) -> None:
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
    assert sorted([s.id async for chunk in store.open_sessions() for s in chunk]) == [s.id for s in good]


async def test_list_sessions_filters_and_pages(store: Store) -> None:
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


async def test_contact_sessions_newest_first(store: Store) -> None:
    history = [make_session(i, conversation="u1", state=SessionState.CLOSED) for i in (3, 1, 2)]
    current = make_session(9, conversation="u1")
    stranger = make_session(5, conversation="u2")
    await store.commit(Change(sessions=[*history, current, stranger]))
    assert [s.id for s in await store.contact_sessions("web:u1")] == ["s0009", "s0003", "s0002", "s0001"]
    assert await store.contact_sessions("web:nobody") == []


async def test_open_sessions_streams_every_open_session(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "READ_CHUNK", 3)
    monkeypatch.setattr(redis_reads, "CHUNK", 3)
    sessions = [make_session(i, state=SessionState.CLOSED if i in (4, 7) else SessionState.OPEN) for i in range(11)]
    sessions.append(make_session(11, started_at=T0 + 2))
    await store.commit(Change(sessions=sessions))
    chunks = [chunk async for chunk in store.open_sessions()]
    assert all(chunks)  # no empty chunk; SQLite's are READ_CHUNK long (Redis's SSCAN count is a hint)
    if isinstance(store, SqliteStore):
        assert [len(chunk) for chunk in chunks] == [3, 3, 3, 1]
    streamed = [s for chunk in chunks for s in chunk]
    expected = sorted((s for s in sessions if s.is_open), key=lambda s: (s.endpoint, s.conversation))
    if isinstance(store, RedisStore):  # Redis streams them in no particular order
        streamed.sort(key=lambda s: (s.endpoint, s.conversation))
    assert [fields(s) for s in streamed] == [fields(s) for s in expected]


async def test_overrides(store: Store, db_path: Path) -> None:
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


async def test_prune(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old handled inbound events and kept web chat messages go; pending events, sent messages
    and other channels' stay. SQLite's dedup ids are the inbox rows, so they go too; Redis's
    expire by their own TTL (``retention.dedup_days`` after acceptance, in real time), so there
    an old dedup id is still known."""
    monkeypatch.setattr(sqlite_writer, "PRUNE_CHUNK", 2)  # several rounds
    monkeypatch.setattr(redis_lifecycle, "DELETE_CHUNK", 2)
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

    sqlite = isinstance(store, SqliteStore)
    assert await store.prune(cutoff, holding_channels={"webchat"}) == 6
    assert await store.prune(cutoff, holding_channels={"webchat"}) == 0
    assert [e.event.dedup_key for e in await store.pending_inbound()] == ["old-pending"]
    assert old_pending is not None
    old_again = await store.add_inbound("web", make_event("old0"), cutoff)
    assert (old_again is not None) == sqlite  # SQLite: its dedup id is gone
    assert await store.add_inbound("web", make_event("new"), cutoff) is None  # this one is kept
    assert [m.key for m in await store.pending_outbox()] == ["w-new", "m-old"]
    assert await store.get_outbound(sent_web_old.id) == sent_web_old


async def test_aclose_flushes_queued_writes_and_is_idempotent(sqlite_store: SqliteStore, db_path: Path) -> None:
    sessions = [make_session(i) for i in range(50)]
    writes = [asyncio.ensure_future(sqlite_store.commit(Change(sessions=[s]))) for s in sessions]
    await asyncio.sleep(0)  # the writes are queued, not yet committed
    await asyncio.gather(sqlite_store.aclose(), sqlite_store.aclose())
    await sqlite_store.aclose()
    await asyncio.gather(*writes)  # every queued write succeeded
    with pytest.raises(StoreError):
        await sqlite_store.commit(Change(sessions=[make_session(99)]))
    with pytest.raises(StoreError):
        await sqlite_store.get_session("s0001")
    store = await reopen(sqlite_store, db_path)
    try:
        assert len([s async for chunk in store.open_sessions() for s in chunk]) == 50
    finally:
        await store.aclose()


async def test_second_store_in_same_process_is_refused(sqlite_store: SqliteStore, db_path: Path) -> None:
    with pytest.raises(StoreLocked) as refused:
        await SqliteStore(db_path).open()
    assert str(db_path) in str(refused.value)
    assert f"pid {os.getpid()}" in str(refused.value)
    await sqlite_store.aclose()
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


async def test_other_process_is_refused_while_open(sqlite_store: SqliteStore, db_path: Path) -> None:
    outcome = await probe(db_path)
    assert outcome == f"locked: database {db_path} is in use by another gateway process (pid {os.getpid()})"
    await sqlite_store.aclose()
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


# -- the public web chat and the data lifecycle (#12, #13): the same contract on both backends --


def conversation_message(
    conversation: str, key: str, text: str, at: float, *, channel: str = "webchat", state: OutboxState | None = None
) -> OutboundMessage:
    message = dataclasses.replace(
        make_message(key, channel=channel, created_at=at, text=text),
        conversation=conversation,
        kind=MessageKind.CLOSURE if key.startswith("close") else MessageKind.REPLY,
    )
    if state is not None:
        message.state = state
    return message


def user_event(conversation: str, key: str, text: str | None, kind: EventKind = EventKind.MESSAGE) -> InboundEvent:
    return InboundEvent(conversation=conversation, kind=kind, dedup_key=key, message_id=key, text=text)


async def test_issued_conversations_persist_and_unused_ones_are_pruned(store: Store, db_path: Path) -> None:
    await store.add_conversation_secret("web", "used", "h1", T0)
    await store.add_conversation_secret("web", "unused", "h2", T0)
    await store.add_conversation_secret("web", "recent", "h3", T0 + 100)
    with pytest.raises(StoreError):  # an id is issued once
        await store.add_conversation_secret("web", "used", "other", T0)
    await store.commit(Change(sessions=[make_session(1, conversation="used", started_at=T0)]))
    assert await store.prune(T0 + 50, holding_channels=["webchat"]) == 1
    assert await store.conversation_secret("web", "used") == "h1"  # it had a session
    assert await store.conversation_secret("web", "unused") is None  # nobody ever wrote
    assert await store.conversation_secret("web", "recent") == "h3"  # not old enough
    assert await store.conversation_secret("other", "used") is None
    store = await reopen(store, db_path)
    try:
        assert await store.conversation_secret("web", "used") == "h1"
    finally:
        await store.aclose()


async def test_pending_messages_of_one_conversation_and_without_the_holding_channels(store: Store) -> None:
    kept = [conversation_message("c1", f"reply:{n}", f"t{n}", T0 + n) for n in range(3)]
    other = conversation_message("c2", "reply:9", "other", T0)
    slack = conversation_message("C1", "reply:s", "slack", T0, channel="slack")
    await store.commit(Change(outbox=[*kept, other, slack]))
    kept[1].state = OutboxState.SENT
    await store.commit(Change(outbox_updates=[kept[1]]))
    assert [m.text for m in await store.pending_outbox_of("web", "c1")] == ["t0", "t2"]
    assert [m.text for m in await store.pending_outbox(skip_channels=["webchat"])] == ["slack"]
    assert len(await store.pending_outbox()) == 4


async def test_history_is_user_lines_and_sent_messages_from_a_time_on(store: Store) -> None:
    await store.add_inbound("web", user_event("c1", "old", "before the session"), T0 - 10)
    await store.add_inbound("web", user_event("c1", "u1", "hello"), T0)
    await store.add_inbound("web", user_event("c1", "img", None), T0 + 1)  # no text: not a line
    await store.add_inbound("web", user_event("c1", "r", None, EventKind.REFRESH), T0 + 2)
    await store.add_inbound("web", user_event("c1", "u2", "again"), T0 + 3)
    await store.add_inbound("web", user_event("c2", "x", "someone else"), T0 + 1)
    replies = [
        conversation_message("c1", "reply:1", "hello", T0 + 0.5),
        conversation_message("c1", "close:s", "bye", T0 + 4),
    ]
    same_time = conversation_message("c1", "reply:3", "at once", T0 + 3)  # after the user line of its time
    unsent = conversation_message("c1", "reply:2", "not yet", T0 + 3.5)
    await store.commit(Change(outbox=[*replies, same_time, unsent]))
    for sent in (*replies, same_time):
        sent.state = OutboxState.SENT
    await store.commit(Change(outbox_updates=[*replies, same_time]))
    lines = await store.history("web", "c1", T0, 10)
    assert [(line.sender, line.kind, line.text, line.message_id) for line in lines] == [
        ("user", "message", "hello", "u1"),
        ("bot", "reply", "hello", None),
        ("user", "refresh", "", "r"),
        ("user", "message", "again", "u2"),
        ("bot", "reply", "at once", None),
        ("bot", "closure", "bye", None),
    ]
    assert [line.at for line in lines] == [T0, T0 + 0.5, T0 + 2, T0 + 3, T0 + 3, T0 + 4]
    assert [line.text for line in await store.history("web", "c1", T0, 2)] == ["at once", "bye"]  # the last 2


async def test_transcript_has_user_messages_and_every_outbox_message_in_a_time_range(store: Store) -> None:
    await store.add_inbound("web", user_event("c1", "early", "too early"), T0 - 1)
    handled = await store.add_inbound("web", user_event("c1", "u1", "hello"), T0)
    image = dataclasses.replace(user_event("c1", "img", None), attachments=({"type": "image", "url": "u"},))
    await store.add_inbound("web", image, T0 + 1)  # still pending: listed too
    await store.add_inbound("web", user_event("c1", "pb", "BUTTON", EventKind.POSTBACK), T0 + 2)
    await store.add_inbound("web", user_event("c1", "r", None, EventKind.REFRESH), T0 + 2.5)  # not a message
    await store.add_inbound("web", user_event("c2", "x", "someone else"), T0 + 1)
    assert handled is not None
    dead = conversation_message("c1", "reply:d", "failed", T0 + 3)
    pending = conversation_message("c1", "reply:p", "waiting", T0 + 4)
    await store.commit(Change(outbox=[dead, pending], handled_events=[handled.id]))
    dead.state = OutboxState.DEAD
    await store.commit(Change(outbox_updates=[dead]))
    await store.commit(Change(outbox=[conversation_message("c1", "reply:late", "too late", T0 + 10)]))

    entries = await store.transcript("web", "c1", T0, T0 + 4, 100)
    assert [(e.at, e.sender, e.kind, e.text, e.state, e.attachments) for e in entries] == [
        (T0, "user", "message", "hello", None, ()),
        (T0 + 1, "user", "message", None, None, ("image",)),
        (T0 + 2, "user", "postback", "BUTTON", None, ()),
        (T0 + 3, "bot", "reply", "failed", "dead", ()),
        (T0 + 4, "bot", "reply", "waiting", "pending", ()),
    ]
    assert [e.text for e in await store.transcript("web", "c1", T0, T0 + 4, 2)] == ["failed", "waiting"]
    assert await store.transcript("web", "c1", T0, T0 + 4, 0) == []


async def test_dead_letters_are_counted_and_only_they_are_deleted(store: Store) -> None:
    dead, pending = make_message("reply:d", created_at=T0), make_message("reply:p", created_at=T0)
    await store.commit(Change(outbox=[dead, pending]))
    assert await store.count_dead_letters() == 0
    dead.state = OutboxState.DEAD
    await store.commit(Change(outbox_updates=[dead]))
    assert await store.count_dead_letters() == 1
    assert await store.delete_dead_letter(pending.id) is False  # a pending message is never dropped
    assert await store.delete_dead_letter(dead.id) is True
    assert await store.delete_dead_letter(dead.id) is False  # gone already
    assert await store.get_outbound(dead.id) is None
    assert await store.count_dead_letters() == 0
    assert [m.key for m in await store.pending_outbox()] == ["reply:p"]


async def test_erasing_a_contact_deletes_its_sessions_messages_and_handled_events(store: Store) -> None:
    contact = Contact(id="web:c1", endpoint="web", conversation="c1", created_at=T0, display_name="Ann")
    other = Contact(id="web:c2", endpoint="web", conversation="c2", created_at=T0)
    closed = make_session(1, conversation="c1", state=SessionState.CLOSED)
    still = make_session(2, conversation="c2")
    done = await store.add_inbound("web", user_event("c1", "u1", "mine"), T0)
    waiting = await store.add_inbound("web", user_event("c1", "u2", "pending"), T0 + 1)
    elsewhere = await store.add_inbound("web", user_event("c2", "u3", "theirs"), T0)
    assert done is not None and waiting is not None and elsewhere is not None
    messages = [conversation_message("c1", "reply:1", "a", T0), conversation_message("c2", "reply:2", "b", T0)]
    await store.commit(
        Change(
            sessions=[closed, still], contacts=[contact, other], outbox=messages, handled_events=[done.id, elsewhere.id]
        )
    )

    # one session, the contact, one message, one handled event; the pending event stays to be handled
    assert await store.erase_contact("web", "c1") == 4
    assert await store.get_contact("web:c1") is None
    assert await store.get_session(closed.id) is None
    assert await store.contact_sessions("web:c1") == []
    assert await store.transcript("web", "c1", T0 - 1, T0 + 10, 100) == [
        TranscriptEntry(T0 + 1, "user", "message", "pending")
    ]
    assert [e.event.dedup_key for e in await store.pending_inbound()] == ["u2"]
    assert await store.erase_contact("web", "c1") == 0
    assert await store.get_contact("web:c2") == other
    assert fields(await store.get_session(still.id)) == fields(still)
    assert [m.text for m in await store.pending_outbox()] == ["b"]
    sessions, _ = await store.list_sessions(SessionQuery())
    assert [s.id for s in sessions] == [still.id]


async def test_retention_of_sessions_contacts_and_messages(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_lifecycle, "DELETE_CHUNK", 2)  # several rounds
    monkeypatch.setattr(sqlite_module, "DELETE_CHUNK", 2)
    cutoff = T0 + 1000
    old_closed = [make_session(n, conversation=f"old{n}", state=SessionState.CLOSED) for n in range(3)]
    recent_closed = make_session(5, conversation="recent", started_at=T0 + 990, state=SessionState.CLOSED)
    old_open = make_session(6, conversation="open", started_at=T0)
    contacts = [Contact(id=f"web:old{n}", endpoint="web", conversation=f"old{n}", created_at=T0) for n in range(3)] + [
        Contact(id="web:optout", endpoint="web", conversation="optout", created_at=T0, opted_out=True),
        Contact(id="web:open", endpoint="web", conversation="open", created_at=T0),
        Contact(id="web:talked", endpoint="web", conversation="talked", created_at=T0, last_user_message_at=cutoff + 1),
    ]
    states = [OutboxState.SENT, OutboxState.SKIPPED, OutboxState.PENDING, OutboxState.DEAD, OutboxState.SENT]
    messages = [
        conversation_message("c1", f"reply:{n}", f"m{n}", T0 if n < 4 else cutoff + 1, state=state)
        for n, state in enumerate(states)
    ]
    await store.commit(Change(sessions=[*old_closed, recent_closed, old_open], contacts=contacts, outbox=messages))

    removed = await store.prune_history(closed_sessions_before=cutoff, messages_before=cutoff)
    assert removed == 3 + 3 + 2  # old closed sessions, their contacts, old sent and skipped messages
    assert await store.prune_history(closed_sessions_before=cutoff, messages_before=cutoff) == 0
    sessions, _ = await store.list_sessions(SessionQuery())
    assert sorted(s.id for s in sessions) == sorted([recent_closed.id, old_open.id])
    kept_contacts = await store.get_contacts([c.id for c in contacts])
    assert sorted(kept_contacts) == ["web:open", "web:optout", "web:talked"]
    assert [await store.get_outbound(m.id) is not None for m in messages] == [False, False, True, True, True]
    assert await store.contact_sessions("web:old0") == []


async def test_parts_sent_is_a_narrow_write_that_survives_a_reopen(store: Store, db_path: Path) -> None:
    first, second = make_message("reply:1:0"), make_message("reply:2:0")
    await store.commit(Change(outbox=[first, second]))
    stored = await store.get_outbound(first.id)
    assert stored is not None and stored.parts_sent == 0
    # In one batch: the progress of one message and a full update of both, whose snapshot
    # still says 0 parts: the update does not undo the progress, nor the progress the update.
    first.attempts, second.state = 3, OutboxState.DEAD
    await asyncio.gather(
        store.record_parts_sent(first.id, 2),
        store.commit(Change(outbox_updates=[first, second])),
        store.record_parts_sent(second.id, 1),
        store.record_parts_sent(second.id, 4),  # the last one wins
    )
    store = await reopen(store, db_path)
    try:
        got = {m.key: m for m in [await store.get_outbound(first.id), await store.get_outbound(second.id)] if m}
    finally:
        await store.aclose()
    assert (got["reply:1:0"].parts_sent, got["reply:1:0"].attempts) == (2, 3)
    assert (got["reply:2:0"].parts_sent, got["reply:2:0"].state) == (4, OutboxState.DEAD)
