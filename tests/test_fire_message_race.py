"""The fire/message race of commit a6114df, reproduced deterministically.

A user message that arrived before its session's deadline must keep the session open, even when
the timer fires while the message is still on its way (README "The fire/message race"). The kill
-9 test found it once by chance; here the test decides when the store answers. The store is the
real SqliteStore on a temp file; a subclass only *holds* chosen calls (the inbox commit, a close's
contact read) until the test releases them, so each interleaving is reached on purpose.

The fix has two halves; with either reverted, at least one test here fails:

- the deadline moves at arrival, before the inbox commit (``SessionManager._extend_at_arrival``):
  ``test_fire_during_the_inbox_commit_keeps_the_session`` needs this half alone (the fire finds
  the session not due and re-arms; no close path runs);
- the close paths re-check the deadline after their contact read: the batch close of an idle
  conversation (``close_due``), ``test_message_during_a_batch_close_keeps_the_session``, which
  needs both halves (the conversation is held, so only the move at arrival moves the deadline);
  a fire queued behind a busy conversation's work (``_close_now``, ``_still_due``),
  ``test_message_during_a_queued_close_keeps_the_session``, which needs the re-check only (the
  conversation is not held, so the move at acceptance, older than the fix, moves it too).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.models import CloseReason, Contact, InboundEvent, MessageKind, Session, SessionState, StoredEvent
from gateway.sessions.timers import EARLY_TOLERANCE_S
from gateway.store.sqlite import SqliteStore
from tests.conftest import Gateway, make_settings, webchat_endpoint
from tests.test_lifecycle import eventually
from tests.test_sessions import _message

EXPIRATION_MINUTES = 0.02  # 1.2 s: long enough for the margins below on a loaded machine
EXPIRATION_S = EXPIRATION_MINUTES * 60
# Test 1 sends its message this long before the deadline: the margin for the sleep to overshoot,
# and (after the fire) for the held commit to be released before the moved deadline comes due.
LEAD_S = 0.4
# Tests 2 and 3: the message's arrival, this long before the deadline (the kill -9 finding: 0.6 ms).
JUST_BEFORE_S = 0.001
ON_TIME_S = 0.1  # README: an inactivity close is committed within 100 ms of its deadline
WAIT_S = 10.0  # timeout of every wait on an event: a hang fails, it never blocks the suite


@dataclass
class Hold:
    """One held store call: ``entered`` once it waits, and it goes on when ``release``d."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_entered(self) -> None:
        await asyncio.wait_for(self.entered.wait(), WAIT_S)

    def release(self) -> None:
        self.released.set()


class Gate:
    """Holds the next calls of one store method, one ``Hold`` each, in call order."""

    def __init__(self) -> None:
        self._next: deque[Hold] = deque()
        self._all: list[Hold] = []

    def hold_next(self) -> Hold:
        hold = Hold()
        self._next.append(hold)
        self._all.append(hold)
        return hold

    async def pass_through(self) -> None:
        if self._next:
            hold = self._next.popleft()
            hold.entered.set()
            await hold.released.wait()

    def release_all(self) -> None:
        self._next.clear()
        for hold in self._all:
            hold.release()


class GatedStore(SqliteStore):
    """The real SqliteStore; a call to a gated method waits for the test's release first (the
    write or read itself is the real one, done after the release)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.inbox = Gate()  # add_inbound: the accept path's inbox commit (group-commit writer)
        self.contact = Gate()  # get_contact: a queued close's read (SessionCloser._close_now)
        self.contacts = Gate()  # get_contacts: a batch close's read (SessionCloser.close_due)

    async def add_inbound(
        self, endpoint: str, event: InboundEvent, arrival_at: float, *, extends_to: float | None = None
    ) -> StoredEvent | None:
        await self.inbox.pass_through()
        return await super().add_inbound(endpoint, event, arrival_at, extends_to=extends_to)

    async def get_contact(self, contact_id: str) -> Contact | None:
        await self.contact.pass_through()
        return await super().get_contact(contact_id)

    async def get_contacts(self, contact_ids: list[str]) -> dict[str, Contact]:
        await self.contacts.pass_through()
        return await super().get_contacts(contact_ids)

    def release_all(self) -> None:
        for gate in (self.inbox, self.contact, self.contacts):
            gate.release_all()


class SessionLog:
    """A session listener of the manager: every session opened and closed, in order."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.a_close = asyncio.Event()

    def __call__(self, session: Session) -> None:
        if session.is_open:
            self.opened.append(session.id)
        else:
            self.closed.append(session.id)
            self.a_close.set()


@dataclass
class Race:
    gateway: Gateway
    store: GatedStore
    log: SessionLog


@pytest.fixture
async def race(tmp_path: Path, start_gateway: Any) -> AsyncIterator[Race]:
    """The real app on a GatedStore (one web chat endpoint, sessions of EXPIRATION_S); every
    hold is released at teardown, so a failing test does not leave the app's shutdown waiting."""
    store = GatedStore(tmp_path / "gateway.db")
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=EXPIRATION_MINUTES)])
    gateway: Gateway = await start_gateway(settings, store=store)
    log = SessionLog()
    gateway.manager.listeners.append(log)
    try:
        yield Race(gateway, store, log)
    finally:
        store.release_all()


async def _open_session(race: Race, conversation: str) -> Session:
    """The user's first message opens the session; its turn done, the conversation is idle."""
    manager = race.gateway.manager
    assert await manager.accept("web", _message(conversation, "first", 1))
    await race.gateway.settle()
    session = manager.open_session("web", conversation)
    assert session is not None and session.expires_at is not None
    assert race.log.opened == [session.id]
    return session


async def _timer_fired(race: Race, fires_before: int) -> None:
    """Wait until the session timer has run once more (it fired at the deadline)."""
    stats = race.gateway.manager.stats

    async def fired() -> bool:
        return stats.timer_fires > fires_before

    await eventually(fired, WAIT_S)


async def _assert_lives_on(race: Race, conversation: str, session: Session, messages: int) -> None:
    """The session survived its old deadline: still open, the same one, with the late message
    counted in it and answered from it, and no close or closure notice anywhere."""
    await race.gateway.settle()
    live = race.gateway.manager.open_session("web", conversation)
    assert live is not None and live.id == session.id, "the session closed although the user wrote in time"
    assert race.log.closed == [] and race.log.opened == [session.id]
    [stored] = await race.gateway.store.contact_sessions(f"web:{conversation}")
    assert stored.id == session.id and stored.state is SessionState.OPEN
    assert stored.message_count == messages and stored.notice is None
    lines = await race.gateway.store.transcript("web", conversation, 0.0, math.inf, 100)
    assert [line.kind for line in lines if line.kind == MessageKind.CLOSURE] == []
    replies = [line for line in lines if line.kind == MessageKind.REPLY]
    assert len(replies) == messages and {line.session_id for line in replies} == {session.id}


async def _assert_closes_once_on_time(race: Race, conversation: str, session: Session, messages: int) -> None:
    """Then the user goes quiet: the session closes once, for inactivity, on time (measured from
    the late message), with exactly one closure notice."""
    await asyncio.wait_for(race.log.a_close.wait(), WAIT_S)
    await race.gateway.settle()
    assert race.log.closed == [session.id] and race.log.opened == [session.id]
    [stored] = await race.gateway.store.contact_sessions(f"web:{conversation}")
    assert stored.id == session.id and stored.state is SessionState.CLOSED
    assert stored.close_reason is CloseReason.INACTIVITY and stored.message_count == messages
    assert stored.closed_at is not None and stored.expires_at is not None
    assert stored.expires_at == pytest.approx(stored.last_activity_at + EXPIRATION_S)
    assert -EARLY_TOLERANCE_S <= stored.closed_at - stored.expires_at < ON_TIME_S
    lines = await race.gateway.store.transcript("web", conversation, 0.0, math.inf, 100)
    assert [line.session_id for line in lines if line.kind == MessageKind.CLOSURE] == [session.id]


async def test_fire_during_the_inbox_commit_keeps_the_session(race: Race) -> None:
    """At-arrival half: the message arrives shortly before the deadline, its inbox commit is
    held until the timer has fired at that deadline. The deadline moved at arrival, so the fire
    finds the session not due and re-arms (before the fix it closed the session, and the message
    then opened a new one)."""
    manager = race.gateway.manager
    session = await _open_session(race, "c1")
    deadline = session.expires_at
    assert deadline is not None
    await asyncio.sleep(max(0.0, deadline - LEAD_S - time.time()))  # no event says "shortly before"
    inbox = race.store.inbox.hold_next()
    fires, rearms = manager.stats.timer_fires, manager.stats.timer_rearms
    accepting = asyncio.create_task(manager.accept("web", _message("c1", "just in time", 2)))
    await inbox.wait_entered()  # its arrival time was read before this
    assert time.time() < deadline, "precondition: the message must arrive before the deadline"

    await _timer_fired(race, fires)  # the deadline passed while the commit was held
    await manager.drain()  # a close started by the fire would be done now
    assert time.time() >= deadline and not accepting.done()
    live = manager.open_session("web", "c1")
    assert live is not None and live.id == session.id, "the fire closed the session during the inbox commit"
    assert race.log.closed == []
    assert manager.stats.timer_rearms > rearms  # the fire found the deadline moved, and re-armed

    inbox.release()
    assert await asyncio.wait_for(accepting, WAIT_S)
    await _assert_lives_on(race, "c1", session, messages=2)
    await _assert_closes_once_on_time(race, "c1", session, messages=2)


async def test_message_during_a_batch_close_keeps_the_session(race: Race) -> None:
    """Re-check half, idle conversation: the timer fired and the batch close is reading the
    contact (held) when a message that arrived before the deadline is accepted. It moves the
    deadline at arrival; the re-check after the read finds the session not due, releases the
    conversation and re-arms, and the message is handled in the same session."""
    manager = race.gateway.manager
    session = await _open_session(race, "c2")
    deadline = session.expires_at
    assert deadline is not None
    reading = race.store.contacts.hold_next()
    await reading.wait_entered()  # the fire at the deadline: the batch close reads the contact
    assert time.time() >= deadline - EARLY_TOLERANCE_S
    # A webhook reads its arrival time before it calls accept (gateway/webhooks.py): this one
    # read it just before the deadline and gets to accept only now, during the close's read.
    assert await manager.accept("web", _message("c2", "just in time", 2), arrival_at=deadline - JUST_BEFORE_S)
    reading.release()
    await _assert_lives_on(race, "c2", session, messages=2)
    await _assert_closes_once_on_time(race, "c2", session, messages=2)


async def test_message_during_a_queued_close_keeps_the_session(race: Race) -> None:
    """Re-check half, busy conversation: the timer fires while a bot message (S13) is in hand
    (held on its contact read), so the fire queues behind it as an item; that close is then
    reading the contact (held) when a message that arrived before the deadline is accepted. The
    re-check after the read (``_still_due``) finds the session not due and re-arms."""
    manager = race.gateway.manager
    session = await _open_session(race, "c3")
    deadline = session.expires_at
    assert deadline is not None
    fires = manager.stats.timer_fires
    busy = race.store.contact.hold_next()
    sending = asyncio.create_task(manager.send_bot_message("web", "c3", "news"))
    await busy.wait_entered()
    await _timer_fired(race, fires)  # the deadline passed while the conversation was busy
    closing = race.store.contact.hold_next()
    busy.release()
    assert (await asyncio.wait_for(sending, WAIT_S)).id == session.id
    await closing.wait_entered()  # the queued fire: the close reads the contact
    assert await manager.accept("web", _message("c3", "just in time", 2), arrival_at=deadline - JUST_BEFORE_S)
    closing.release()
    await _assert_lives_on(race, "c3", session, messages=2)
    lines = await race.gateway.store.transcript("web", "c3", 0.0, math.inf, 100)
    assert [line.session_id for line in lines if line.kind == MessageKind.BOT] == [session.id]
    await _assert_closes_once_on_time(race, "c3", session, messages=2)
