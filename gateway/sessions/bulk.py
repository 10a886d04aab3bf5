"""Passes over many conversations at once: the restore at start, the conversations taken over
from another instance, a changed endpoint policy, a wall-clock step.

Each sets the deadlines and arms the timers of up to millions of sessions outside the
conversations' queues, so each yields to the loop every ``YIELD_EVERY`` sessions: no pass
stalls the webhooks meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.models import Session, StoredEvent
from gateway.policy import EndpointPolicy
from gateway.sessions.book import SessionBook
from gateway.sessions.closing import SessionCloser
from gateway.sessions.ownership import Ownership
from gateway.sessions.scheduler import ConversationScheduler
from gateway.sessions.state import Conversation
from gateway.sessions.timers import SessionTimers
from gateway.settings import SessionMode
from gateway.store.base import Store

log = logging.getLogger("gateway.sessions")

YIELD_EVERY = 5000  # sessions restored, re-armed or re-deadlined between yields to the loop


class BulkPasses:
    """The session manager's passes over many conversations. ``policies`` is the manager's live
    map; ``queue`` queues one event on its conversation, ``hand_over`` queues the events of
    conversations taken over (nothing once the manager is closing)."""

    def __init__(
        self,
        store: Store,
        ownership: Ownership,
        policies: dict[str, EndpointPolicy],
        scheduler: ConversationScheduler,
        book: SessionBook,
        closer: SessionCloser,
        timers: SessionTimers,
        *,
        queue: Callable[[StoredEvent], None],
        hand_over: Callable[[list[StoredEvent]], None],
    ) -> None:
        self._store = store
        self._ownership = ownership
        self._policies = policies
        self._scheduler = scheduler
        self._book = book
        self._closer = closer
        self._timers = timers
        self._queue = queue
        self._hand_over = hand_over

    async def restore(self) -> None:
        """Load every open session (one process owns them all), close those of endpoints no
        longer configured, re-queue pending inbound events (they move deadlines), then arm every
        timer; sessions overdue since before the restart close at once."""
        removed: list[Session] = []
        restored: list[Conversation] = []
        # Seconds of inactivity by endpoint (None: never expires), looked up once, not per session.
        expiration_s = {name: policy.expiration_s for name, policy in self._policies.items()}
        async for chunk in self._store.open_sessions():
            by_endpoint: dict[str, list[Session]] = {}
            for session in chunk:
                endpoint = session.endpoint
                if endpoint not in expiration_s:
                    removed.append(session)
                    continue
                # Deadlines derive from the current policy (EndpointPolicy.deadline): a setting
                # changed while we were down applies to the restored sessions too.
                seconds = expiration_s[endpoint]
                session.expires_at = None if seconds is None else session.last_activity_at + seconds
                by_endpoint.setdefault(endpoint, []).append(session)
            for endpoint, sessions in by_endpoint.items():
                slots = self._scheduler.restored_slots(endpoint, [session.conversation for session in sessions])
                self._book.restored(slots, sessions)
                restored += slots
            await asyncio.sleep(0)  # a chunk is a few thousand sessions (YIELD_EVERY)
        loaded = len(restored)
        await self._closer.close_removed(removed)
        for stored in await self._store.pending_inbound():
            self._queue(stored)
        slots = [slot for slot in restored if slot.session is not None and slot.armed_at is None]
        restored.clear()
        for start in range(0, len(slots), YIELD_EVERY):
            self._book.arm_all(slots[start : start + YIELD_EVERY])
            await asyncio.sleep(0)
        log.info("restored %d open sessions, %d pending events re-queued", loaded, self._scheduler.pending_events)

    async def adopt(self, sessions: list[Session], events: list[StoredEvent]) -> None:
        """Take conversations over: their open sessions join memory with their timers armed
        (overdue ones close at once), their pending events queue in order. A session's stored
        deadline stands (its pending events move it further when queued)."""
        removed: list[Session] = []
        adopted: list[Conversation] = []
        for n, session in enumerate(sessions, start=1):
            if session.endpoint not in self._policies:
                removed.append(session)
                continue
            slot = self._scheduler.slot(session.endpoint, session.conversation)
            if slot.session is not None:
                continue  # already here (a takeover raced a message)
            self._book.restored([slot], [session])
            adopted.append(slot)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        await self._closer.close_removed(removed)
        self._hand_over(events)
        for n, slot in enumerate(adopted, start=1):
            if slot.session is not None and not self._scheduler.is_held(slot):
                self._book.arm(slot)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        for slot in adopted:
            self._scheduler.forget_if_empty(slot)

    async def apply_policy(self, policy: EndpointPolicy) -> None:
        """Give the open sessions of ``policy``'s endpoint the deadlines it sets (stored first
        where the ownership layer keeps them), re-arming or disarming their timers. ``policy`` is
        in the live map already; the pass stops where a newer one took over meanwhile."""
        if self._ownership.stores_deadlines:
            slots = self._scheduler.slots(policy.endpoint)
            for start in range(0, len(slots), YIELD_EVERY):
                chunk = slots[start : start + YIELD_EVERY]
                await self._ownership.deadlines_moved(
                    [(s.session.id, policy.deadline(s.session.last_activity_at)) for s in chunk if s.session]
                )
                if self._policies.get(policy.endpoint) is not policy:
                    return  # a newer policy took over meanwhile; it re-applies to every session
        for done, slot in enumerate(self._scheduler.slots(policy.endpoint), start=1):
            if done % YIELD_EVERY == 0:
                await asyncio.sleep(0)
                if self._policies.get(policy.endpoint) is not policy:
                    return  # a newer policy took over; it re-applies to every session
            session = slot.session
            if session is None:
                continue
            session.expires_at = policy.deadline(session.last_activity_at)
            if session.expires_at is None or policy.mode is SessionMode.LAZY:
                self._timers.disarm(slot)
            elif not self._scheduler.is_held(slot):
                self._book.arm(slot)

    async def rearm_all(self) -> None:
        """Re-arm every open session's timer for its wall-clock deadline (the wall clock
        stepped): the one loop wake-up moves earlier if the earliest deadline needs it (entries
        are keyed by it, so they stay), early ones re-arm themselves when they fire, and
        sessions without an entry get one."""
        self._timers.rewake()
        for done, slot in enumerate(self._scheduler.slots(), start=1):
            if done % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if slot.session is not None and not self._scheduler.is_held(slot):
                self._book.arm(slot)
