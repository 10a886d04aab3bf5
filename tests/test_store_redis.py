"""The Redis store's own promises, beyond the shared contract (tests/test_store.py): the close
claim (two instances closing one session make one close and one notice), the deadline moved at
acceptance by another instance, and fencing tokens (an old owner's writes are refused)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest

from gateway.errors import LeaseLost
from gateway.models import Change, CloseReason, EventKind, InboundEvent, MessageKind, OutboundMessage, Session
from gateway.store.redis import RedisStore
from tests.redis_kit import REDIS_URL


@pytest.fixture
async def two(redis_prefix: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two instances' stores on one prefix."""
    a, b = RedisStore(REDIS_URL, redis_prefix), RedisStore(REDIS_URL, redis_prefix)
    await a.open()
    await b.open()
    yield a, b
    await a.aclose()
    await b.aclose()


def due_session(n: int, *, expires_in_s: float = -0.5) -> Session:
    now = time.time()
    return Session(
        id=f"s{n}",
        endpoint="web",
        channel="webchat",
        conversation=f"c{n}",
        started_at=now - 60,
        last_activity_at=now - 60,
        expires_at=now + expires_in_s,
    )


def closing(session: Session) -> Change:
    """What an instance whose timer fired commits: the close claim and its notice."""
    closed = dataclasses.replace(session)
    closed.state, closed.closed_at = closed.state.CLOSED, time.time()
    closed.close_reason, closed.notice = CloseReason.INACTIVITY, "queued"
    notice = OutboundMessage(
        endpoint="web",
        channel="webchat",
        conversation=session.conversation,
        kind=MessageKind.CLOSURE,
        text="bye",
        key=f"close:{session.id}",
        created_at=time.time(),
        session_id=session.id,
    )
    return Change(closes=[closed], outbox=[notice])


async def test_two_instances_firing_for_one_session_make_one_close_and_one_notice(
    two: tuple[RedisStore, RedisStore],
) -> None:
    a, b = two
    sessions = [due_session(n) for n in range(200)]
    await a.commit(Change(sessions=sessions))
    changes = [(closing(s), closing(s)) for s in sessions]
    await asyncio.gather(*(a.commit(x) for x, _ in changes), *(b.commit(y) for _, y in changes))
    for x, y in changes:
        # Exactly one claim won; the loser's notice was not queued.
        assert (x.closes[0].id in x.refused_closes) != (y.closes[0].id in y.refused_closes)
        assert sorted([x.outbox[0].id, y.outbox[0].id])[0] == 0
    pending = await a.pending_outbox()
    assert sorted(m.key for m in pending) == sorted(f"close:{s.id}" for s in sessions)
    for s in sessions:
        stored = await a.get_session(s.id)
        assert stored is not None and stored.state is stored.state.CLOSED


async def test_a_message_accepted_elsewhere_before_the_deadline_wins_over_the_close(
    two: tuple[RedisStore, RedisStore],
) -> None:
    a, b = two
    session = due_session(1, expires_in_s=0.3)
    await a.commit(Change(sessions=[session]))
    # Instance b accepts a message before the deadline: the stored deadline moves at once.
    event = InboundEvent(conversation="c1", kind=EventKind.MESSAGE, dedup_key="m1", text="still here")
    moved_to = time.time() + 30
    assert await b.add_inbound("web", event, time.time(), extends_to=moved_to) is not None
    await asyncio.sleep(0.35)  # a's memory still says due
    change = closing(session)
    await a.commit(change)
    assert change.refused_closes == {session.id: pytest.approx(moved_to)}
    assert change.outbox[0].id == 0 and await a.pending_outbox() == []
    stored = await a.get_session(session.id)
    assert stored is not None and stored.is_open


async def test_an_old_owners_writes_are_refused_once_another_took_over(two: tuple[RedisStore, RedisStore]) -> None:
    a, b = two
    a.instance_id, b.instance_id = "instance-a", "instance-b"
    event = InboundEvent(conversation="c1", kind=EventKind.MESSAGE, dedup_key="m1", text="hi")
    stored = await a.add_inbound("web", event, time.time())
    assert stored is not None and stored.owner is None and "web:c1" in a.leases  # a took the free lease
    later = InboundEvent(conversation="c1", kind=EventKind.MESSAGE, dedup_key="m2", text="again")
    forwarded = await b.add_inbound("web", later, time.time())
    assert forwarded is not None and forwarded.owner == "instance-a"  # b woke the owner
    # b takes the conversation over (as after a's death): a new token.
    b.leases["web:c1"] = "taken-over"
    await b.client.hset(b.keys.lease("web:c1"), mapping={"owner": "instance-b", "token": "taken-over"})
    session = due_session(1, expires_in_s=60)
    with pytest.raises(LeaseLost):
        await a.commit(Change(sessions=[session], handled_events=[stored.id]))
    assert await a.get_session(session.id) is None  # nothing of the refused change was written
    await b.commit(Change(sessions=[session], handled_events=[stored.id]))
    assert await b.get_session(session.id) is not None
