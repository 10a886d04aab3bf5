"""The session manager: one open session per conversation, each with its own inactivity timer.

A facade over the parts of ``gateway.sessions``: the scheduler (per-conversation order), the
message turn, the close paths, the timers, the book that keeps memory in step with the store,
and the bulk passes (restore, takeover, a changed policy, a clock step). Data flows one way:
``accept`` (called by the web layer once the event is parsed) commits the event to the durable
inbox, moves the session's deadline at once, and queues the event on its conversation.

The fire/message race: the fire is an item in the conversation's own queue (or, when the
conversation is idle, a batch close that holds the conversation meanwhile), and every close
re-checks the deadline first. So either a message accepted before the close moved the deadline
and the session lives on, or the session closes and the message opens a new one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterable

from gateway.close_scripts import CloseScripts
from gateway.errors import LeaseLost, Overloaded, SessionNotFound, SessionNotOpen
from gateway.flows import Flow
from gateway.logs import log_context
from gateway.metrics import Metrics
from gateway.models import CloseReason, InboundEvent, Session, StoredEvent
from gateway.policy import EndpointPolicy
from gateway.sessions.book import SessionBook, SessionListener
from gateway.sessions.bulk import BulkPasses
from gateway.sessions.clockwatch import ClockWatch
from gateway.sessions.closing import SessionCloser
from gateway.sessions.ownership import Ownership, SoleOwner
from gateway.sessions.scheduler import ConversationScheduler
from gateway.sessions.state import (
    BotMessageItem,
    CloseItem,
    Conversation,
    EraseItem,
    ExpireItem,
    ManagerStats,
    OutboxSink,
    WorkItem,
)
from gateway.sessions.timers import SessionTimers
from gateway.sessions.turn import MessageTurn
from gateway.store.base import Store

log = logging.getLogger("gateway.sessions")


class SessionManager:
    """Owns the open sessions and their timers. ``start`` restores; ``aclose`` stops."""

    def __init__(
        self,
        store: Store,
        flow: Flow,
        outbox: OutboxSink,
        policies: dict[str, EndpointPolicy],
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        error_reply: str | None = None,
        max_pending_events: int = 10_000,
        own_budgets: Iterable[str] = (),
        scripts: CloseScripts | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        self._store = store
        self._ownership: Ownership = ownership or SoleOwner()
        self._policies = dict(policies)  # shared with the parts below; set_policy updates it
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._max_pending = max_pending_events
        self._closing = False
        self.ready = False
        self.stats = ManagerStats()
        # Endpoints anyone on the internet can reach (web chat) get a backlog budget of their
        # own: their flood never makes a platform webhook answer 503 (DESIGN.md).
        self._scheduler = ConversationScheduler(
            self._policies,
            handle=self._handle,
            on_failure=self._on_failure,
            close_batch=self._close_due,
            on_forget=None if self._ownership.owns_everything else self._forgotten,
            own_budgets=own_budgets,
        )
        self._timers = SessionTimers(clock, self.stats, on_due=self._scheduler.expire, metrics=self._metrics)
        self._book = SessionBook(
            store, outbox, self._timers, self._policies, metrics=self._metrics, stats=self.stats, clock=clock
        )
        self._closer = SessionCloser(
            store,
            self._book,
            self._scheduler,
            self._timers,
            self._policies,
            metrics=self._metrics,
            clock=clock,
            scripts=scripts,
        )
        self._turn = MessageTurn(
            store,
            flow,
            self._book,
            self._closer,
            self._policies,
            metrics=self._metrics,
            clock=clock,
            error_reply=error_reply,
        )
        self._bulk = BulkPasses(
            store,
            self._ownership,
            self._policies,
            self._scheduler,
            self._book,
            self._closer,
            self._timers,
            queue=self._enqueue,
            hand_over=self.enqueue,
        )
        self._metrics.gauge("gateway_open_sessions", lambda: float(self._book.open_count))
        self._clock_watch = ClockWatch(clock, lambda _step: self.rearm_all())

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore: load open sessions, re-queue pending inbound events (they move deadlines),
        then arm every timer; sessions overdue since before the restart close at once.

        With several instances (``ownership.owns_everything`` false) nothing is loaded here: the
        ownership layer hands conversations over as this instance takes them (``adopt``).

        The cyclic garbage collector is paused meanwhile: a million new long-lived objects
        would trigger collection after collection, each walking all of them (measured at 1M
        sessions: 4 s of a 12.6 s restore, and 12.6 s -> 5.7 s without them). Restore makes
        no cyclic garbage; ``chat-gateway serve`` collects once and freezes right after start.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._restore()
        finally:
            if collecting:
                gc.enable()

    async def _restore(self) -> None:
        self._scheduler.start()
        if self._ownership.owns_everything:
            await self._bulk.restore()
        self.ready = True
        self._clock_watch.start()

    async def aclose(self) -> None:
        """Stop taking work, let workers finish the item in hand, cancel timers. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self.ready = False
        await self._clock_watch.aclose()
        self._closer.stop()
        self._timers.stop()
        for slot in self._scheduler.slots():
            self._timers.disarm(slot)
        await self._scheduler.aclose()
        await self._closer.aclose()

    @property
    def open_count(self) -> int:
        return self._book.open_count

    @property
    def pending_events(self) -> int:
        """Accepted events not yet handled."""
        return self._scheduler.pending_events

    @property
    def listeners(self) -> list[SessionListener]:
        """Called with every session opened or closed (web chat sockets follow their session)."""
        return self._book.listeners

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until no conversation has work queued or in hand (for tests and benchmarks)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._scheduler.busy:
            if loop.time() > deadline:
                raise TimeoutError("session manager did not drain")
            await asyncio.sleep(0.005)

    # -- inbound -----------------------------------------------------------------------------

    async def accept(self, endpoint: str, event: InboundEvent, arrival_at: float | None = None) -> bool:
        """Commit ``event`` durably and queue it; False when it is a redelivery (seen before).

        Returns once the event is in the inbox, so the caller may answer 2xx. The deadline of
        the conversation's open session moves now, not when a worker gets to the event.
        """
        if self._closing:
            raise Overloaded("gateway is shutting down")
        if self._scheduler.backlog(endpoint) >= self._max_pending:
            # The backlog waits on disk, but unbounded it would only grow: say "later" (503).
            self._metrics.inc("gateway_events_total", endpoint=endpoint, outcome="overloaded")
            raise Overloaded(f"{self._scheduler.backlog(endpoint)} events wait to be handled; try again later")
        arrival = self._clock() if arrival_at is None else arrival_at
        policy = self._policies.get(endpoint)
        extends_to = policy.deadline(arrival) if policy is not None and event.is_interaction else None
        if extends_to is not None and self._ownership.owns_everything:
            self._extend_at_arrival(endpoint, event.conversation, arrival, extends_to)
        admitted: list[StoredEvent] = []
        with self._scheduler.admitting(endpoint):
            stored = await self._store.add_inbound(endpoint, event, arrival, extends_to=extends_to)
            if stored is not None and stored.owner is None and not self._ownership.owns_everything:
                admitted = await self._ownership.admit(stored)
        # Nothing awaits from here to _enqueue: the pending count takes over from admitting.
        if stored is None:
            self._metrics.inc("gateway_events_total", endpoint=endpoint, outcome="duplicate")
            return False
        self._metrics.inc("gateway_events_total", endpoint=endpoint, outcome="accepted")
        if log.isEnabledFor(logging.DEBUG):  # log_context costs a dict per call
            log.debug(
                "event in: endpoint=%s conversation=%s kind=%s id=%s%s",
                endpoint,
                event.conversation,
                event.kind,
                stored.id,
                "" if stored.owner is None else f" (to instance {stored.owner})",
                extra=log_context(endpoint, event.conversation),
            )
        if stored.owner is not None:
            return True  # another instance owns the conversation: the store woke it
        if self._ownership.owns_everything:
            self._enqueue(stored)
        else:
            self.enqueue(admitted)
        return True

    def _extend_at_arrival(self, endpoint: str, conversation: str, arrival: float, extends_to: float) -> None:
        """A user message arrived before its session's deadline: the deadline moves now, before
        the inbox commit, so a timer firing during that commit finds the session not due (the
        close paths re-check after every await). Only in memory; the turn commits it. A
        redelivery found in the inbox moves it too: the user did write, and it is one period."""
        slot = self._scheduler.find(endpoint, conversation)
        if slot is not None:
            _move_deadline(slot.session, arrival, extends_to)

    def enqueue(self, events: list[StoredEvent]) -> None:
        """Queue events of owned conversations, in order (the ownership layer's hand-over)."""
        if self._closing:
            return  # they stay pending in the store for the next owner
        for stored in events:
            self._enqueue(stored)

    def _enqueue(self, stored: StoredEvent) -> None:
        slot = self._scheduler.slot(stored.endpoint, stored.event.conversation)
        policy = self._policies.get(stored.endpoint)
        if stored.event.is_interaction and policy is not None and not self._scheduler.is_held(slot):
            # Move the deadline at acceptance (lazy re-arm: the handle re-arms when it fires).
            _move_deadline(slot.session, stored.arrival_at, policy.deadline(stored.arrival_at))
        if stored.contact_known and not self._scheduler.runs_next(slot):
            # The contact read with the inbox commit holds only if no other item of the
            # conversation (a turn, a close) can change it before this event's turn.
            stored.contact, stored.contact_known = None, False
        self._scheduler.push(slot, stored)

    async def _handle(self, slot: Conversation, item: WorkItem) -> None:
        if isinstance(item, StoredEvent):
            await self._turn.handle_event(slot, item)
        elif isinstance(item, ExpireItem):
            await self._closer.handle_expire(slot, item)
        elif isinstance(item, CloseItem):
            await self._closer.handle_close(slot, item)
        elif isinstance(item, BotMessageItem):
            await self._turn.handle_bot_message(slot, item)
        elif isinstance(item, EraseItem):
            await self._closer.handle_erase(slot, item)
        else:
            await self._closer.handle_clear_profiles(slot, item)

    async def _on_failure(self, slot: Conversation, item: WorkItem, exc: Exception) -> None:
        if isinstance(exc, LeaseLost):
            # Another instance took the conversation over: its events stay pending for it.
            for lost in [item, *self._scheduler.discard_work(slot)]:
                if isinstance(lost, CloseItem | BotMessageItem | EraseItem) and not lost.done.done():
                    lost.done.set_exception(exc)
            self._book.forget(slot)
            log.warning("conversation %s/%s moved to another instance", slot.endpoint, slot.conversation)
            return
        if isinstance(item, CloseItem | BotMessageItem | EraseItem) and not item.done.done():
            item.done.set_exception(exc)
        if isinstance(item, StoredEvent):
            await self._turn.give_up_on(item)

    def _forgotten(self, slot: Conversation) -> None:
        self._ownership.forgotten(slot.endpoint, slot.conversation)

    # -- several instances: conversations taken over --------------------------------------------

    async def adopt(self, sessions: list[Session], events: list[StoredEvent]) -> None:
        """Take over conversations (several instances): their open sessions join memory with
        their timers armed (overdue ones close at once), their pending events queue in order.
        A session's stored deadline stands (its pending events move it further when queued)."""
        if not self._closing:
            await self._bulk.adopt(sessions, events)

    def has_conversation(self, endpoint: str, conversation: str) -> bool:
        """Whether this process has the conversation in memory (a session or work)."""
        return self._scheduler.find(endpoint, conversation) is not None

    async def _close_due(self, batch: list[Conversation]) -> None:
        await self._closer.close_due(batch)

    # -- operator actions --------------------------------------------------------------------

    def open_session(self, endpoint: str, conversation: str) -> Session | None:
        """The open session of a conversation, from memory."""
        slot = self._scheduler.find(endpoint, conversation)
        return slot.session if slot is not None else None

    def live_view(self, session: Session) -> Session:
        """The in-memory version of an open session (its deadline may have moved since the
        last write), else the given one."""
        live = self.open_session(session.endpoint, session.conversation)
        return live if live is not None and live.id == session.id else session

    async def close(self, session_id: str, *, reason: CloseReason = CloseReason.ADMIN, notify: bool = True) -> Session:
        """Close an open session now (admin API); raises SessionNotFound / SessionNotOpen.
        With several instances, the one that holds the conversation closes it."""
        session = await self._store.get_session(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        if not self._ownership.holds(session.endpoint, session.conversation):
            return await self._ownership.close_elsewhere(session, notify)
        live = self.open_session(session.endpoint, session.conversation)
        if live is None or live.id != session_id:
            raise SessionNotOpen(session_id)
        done: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        slot = self._scheduler.slot(session.endpoint, session.conversation)
        self._scheduler.push(slot, CloseItem(session_id, reason=reason, notify=notify, done=done))
        return await done

    async def erase_contact(self, endpoint: str, conversation: str) -> int:
        """Erase a contact: its open session is closed silently, then the store deletes the
        contact, its sessions and messages (``Store.erase_contact``), in the conversation's
        queue, so no turn of it runs in between. Returns the number of rows deleted."""
        if endpoint not in self._policies:  # no open session can exist: closed at start
            return await self._store.erase_contact(endpoint, conversation)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._scheduler.push(self._scheduler.slot(endpoint, conversation), EraseItem(done))
        return await done

    async def send_bot_message(self, endpoint: str, conversation: str, text: str) -> Session:
        """A bot-initiated message; opens a non-interactive session when none is open (S13).
        With several instances, the one that holds the conversation sends it."""
        if endpoint not in self._policies:
            raise SessionNotFound(f"unknown endpoint {endpoint}")
        if not self._ownership.holds(endpoint, conversation):
            return await self._ownership.bot_message_elsewhere(endpoint, conversation, text)
        done: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self._scheduler.push(self._scheduler.slot(endpoint, conversation), BotMessageItem(text, done))
        return await done

    async def set_policy(self, policy: EndpointPolicy) -> None:
        """Apply a changed endpoint policy to its open sessions at once (re-arming timers),
        yielding to the loop every few thousand sessions so a big endpoint never stalls it.

        With several instances the new deadlines are stored first (a close claim checks the
        stored deadline), then memory follows."""
        self._policies[policy.endpoint] = policy
        await self._bulk.apply_policy(policy)

    async def rearm_all(self) -> None:
        """Re-arm every open session's timer for its wall-clock deadline (after the wall clock
        stepped), yielding every few thousand sessions."""
        await self._bulk.rearm_all()

    def policy(self, endpoint: str) -> EndpointPolicy | None:
        return self._policies.get(endpoint)


def _move_deadline(session: Session | None, arrival: float, deadline: float | None) -> None:
    """A user message that arrived before the open session's deadline moves it to ``deadline``
    (never earlier; in memory: the message's turn commits it)."""
    if (
        session is not None
        and session.is_open
        and deadline is not None
        and session.expires_at is not None
        and session.expires_at > arrival
    ):
        session.expires_at = max(session.expires_at, deadline)
